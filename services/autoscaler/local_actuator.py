"""The local actuator: expert pools as processes on this machine (what `expertmesh up` runs).

Scale-up starts pool processes (new ids `pool-<n>`, free ports), waits until they serve, registers them and
rebalances onto them. Scale-down drains the newest pools first, then stops the processes this actuator
started; a pool that `up` started is drained and left idle (it is `up`'s child, stopped with it).
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

from services.autoscaler.actuation import add_pools, drain_pools
from services.expert.server import pool_argv
from services.rpc.health import is_serving
from services.rpc.processes import die_with_parent, free_port
from services.state.placement import Pool
from services.state.placement_store import RedisPlacementStore

log = logging.getLogger(__name__)


def _ordinal(pool_id: str) -> int:
    tail = pool_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


class LocalActuator:
    def __init__(
        self,
        store: RedisPlacementStore,
        model_dir: str,
        threads: int = 1,
        window_s: float = 30.0,
        grace_s: float = 2.0,
        log_dir: Path | None = None,
        device: str = "auto",
    ):
        self.store, self.model_dir, self.threads, self.device = store, model_dir, threads, device
        self.window_s, self.grace_s, self.log_dir = window_s, grace_s, log_dir
        self.started: dict[str, subprocess.Popen] = {}

    def scale_up(self, target: int, timeout_s: float = 300.0) -> None:
        placement = self.store.get()
        count = len(placement.pools)
        slots = min(p.slots for p in placement.pools.values())
        next_ordinal = max([_ordinal(p) for p in placement.pools] + [_ordinal(p) for p in self.started] + [-1]) + 1
        new = []
        for k in range(target - count):
            pool_id, port = f"pool-{next_ordinal + k}", free_port()
            out = open(self.log_dir / f"{pool_id}.log", "ab") if self.log_dir else subprocess.DEVNULL
            self.started[pool_id] = subprocess.Popen(
                pool_argv(self.model_dir, pool_id, self.store.url, port, self.threads, device=self.device),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
            new.append(Pool(pool_id, f"127.0.0.1:{port}", slots))
        deadline = time.monotonic() + timeout_s
        for pool in new:
            while not is_serving(pool.address):
                if self.started[pool.pool_id].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pool {pool.pool_id} did not start")
                time.sleep(0.2)
        add_pools(self.store, new, self.window_s, self.grace_s)
        log.info("scaled pools %d -> %d", count, target)

    def scale_down(self, target: int) -> None:
        placement = self.store.get()
        if target < 1 or target >= len(placement.pools):
            return
        newest_first = sorted(placement.pools, key=lambda p: (_ordinal(p), p), reverse=True)
        leaving = set(newest_first[: len(placement.pools) - target])
        drain_pools(self.store, leaving, self.window_s, self.grace_s)
        for pool_id in leaving & set(self.started):
            proc = self.started.pop(pool_id)
            proc.terminate()
            proc.wait(30)
        log.info("scaled pools %d -> %d", len(placement.pools), target)

    def close(self) -> None:
        for proc in self.started.values():
            proc.terminate()
