"""Keeping `expertmesh up`'s children alive: a crashed pool, autoscaler or Redis is restarted, with a back-off.

- Redis comes back on its port with its data (an append-only file in the run's log folder): the placement and
  the load survive, and the gateway, pools and autoscaler reconnect by themselves.
- A pool comes back on its port and loads its share of the placement. If the autoscaler has re-placed its
  experts meanwhile (failover), the pool is registered again and the experts are rebalanced onto it.
- The autoscaler comes back and carries on from Redis.
- The gateway's exit stops the deployment (clients talk to it; there is nothing to fail over to).

Back-off: 1 s after a crash, doubling up to 30 s while a child keeps crashing within a minute of its start.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import typer

from services.cli.up_processes import Deployment

FIRST_BACKOFF_S, MAX_BACKOFF_S, STABLE_AFTER_S = 1.0, 30.0, 60.0


@dataclass
class _Restart:
    due: float
    backoff: float


class Supervisor:
    def __init__(
        self,
        dep: Deployment,
        redis_url: str,
        pools: dict[str, str],
        slots: int,
        load_window_s: float,
        grace_s: float = 2.0,
    ):
        self.dep, self.redis_url, self.pools, self.slots = dep, redis_url, pools, slots
        self.load_window_s, self.grace_s = load_window_s, grace_s
        self._started = {name: time.monotonic() for name, _ in dep.processes}
        self._backoff: dict[str, float] = {}
        self._pending: dict[str, _Restart] = {}
        self._rejoin: set[str] = set()  # restarted pools to register again once they serve
        self.restarts = 0

    def run(self, stopping: Callable[[], bool]) -> None:
        """Until a signal, or the gateway exits."""
        while not stopping():
            if self._tick():
                return
            time.sleep(0.2)

    def _tick(self) -> bool:
        now = time.monotonic()
        for name in self.dep.dead():
            if name in self._pending:
                continue
            if name == "gateway":
                typer.echo(f"expertmesh: {self.dep.why_dead(name)}; stopping", err=True)
                return True
            stable = now - self._started.get(name, now) > STABLE_AFTER_S
            backoff = (
                FIRST_BACKOFF_S if stable else min(MAX_BACKOFF_S, self._backoff.get(name, FIRST_BACKOFF_S / 2) * 2)
            )
            self._backoff[name] = backoff
            self._pending[name] = _Restart(now + backoff, backoff)
            typer.echo(f"expertmesh: {self.dep.why_dead(name)}; restarting in {backoff:g} s", err=True)
        for name, restart in list(self._pending.items()):
            if now >= restart.due:
                del self._pending[name]
                self.dep.restart(name)
                self._started[name] = time.monotonic()
                self.restarts += 1
                if name in self.pools:
                    self._rejoin.add(name)
        self._rejoin_pools()
        return False

    def _rejoin_pools(self) -> None:
        """A restarted pool that serves again and is no longer in the placement is registered and rebalanced onto."""
        if not self._rejoin:
            return
        from services.autoscaler.actuation import add_pools
        from services.rpc.health import is_serving
        from services.state.placement import Pool
        from services.state.placement_store import RedisPlacementStore

        for name in list(self._rejoin):
            address = self.pools[name]
            if not is_serving(address, timeout_s=0.5):
                continue
            self._rejoin.discard(name)
            try:
                store = RedisPlacementStore(self.redis_url)
                if name not in store.get().pools:
                    add_pools(store, [Pool(name, address, self.slots)], self.load_window_s, self.grace_s)
                    typer.echo(f"expertmesh: {name} is back and holds experts again", err=True)
            except Exception as exc:  # noqa: BLE001 - Redis away or a race with the autoscaler: next restart
                typer.echo(f"expertmesh: {name} is back but could not be registered: {exc}", err=True)
