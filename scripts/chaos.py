"""Chaos under load (RELIABILITY.md): `expertmesh up --pools 3 --replicas-per-expert 2` with fp32 dispatch, C
concurrent greedy streams for D seconds while a timeline SIGKILLs a pool, SIGKILLs the autoscaler, and stops
Redis (SIGSTOP) for 15 s. Prints failed requests, outputs that differ from the in-process engine's, the time
until every expert has two replicas again after each kill, and the requests served while Redis was stopped.

Usage: .venv/bin/python scripts/chaos.py [--duration 120] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.simplefilter("ignore")

import torch  # noqa: E402

from services.cli.gateway_client import GatewayClient  # noqa: E402
from services.format.model_writer import write_random_model  # noqa: E402
from services.format.presets import preset_config  # noqa: E402
from services.gateway.engine import Engine  # noqa: E402
from services.gateway.sampling import SamplingParams  # noqa: E402
from services.rpc.health import is_serving  # noqa: E402
from services.state.placement_store import RedisPlacementStore  # noqa: E402
from tests.local_deployment import UpProcess  # noqa: E402

NEW_TOKENS = 16


class Load:
    """C threads sending greedy requests in a loop; every answer checked against the in-process engine."""

    def __init__(self, gateway: str, prompts: list[list[int]], expected: list[list[int]], concurrency: int):
        self.gateway, self.prompts, self.expected = gateway, prompts, expected
        self.ok = self.failed = self.wrong = 0
        self.errors: list[str] = []
        self.done_at: list[float] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(concurrency)]

    def _run(self, worker: int) -> None:
        client = GatewayClient(self.gateway, timeout_s=120)
        i = worker
        while not self._stop.is_set():
            k = i % len(self.prompts)
            try:
                out = client.generate(None, self.prompts[k], NEW_TOKENS, ignore_eos=True)["token_ids"]
                with self._lock:
                    self.ok += out == self.expected[k]
                    self.wrong += out != self.expected[k]
                    self.done_at.append(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with self._lock:
                    self.failed += 1
                    details = exc.details() if hasattr(exc, "details") else str(exc)
                    self.errors.append(f"{type(exc).__name__}: {details}")
            i += len(self.threads)

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(180)

    def served_between(self, a: float, b: float) -> int:
        with self._lock:
            return sum(a <= t < b for t in self.done_at)


def wait_restored(store: RedisPlacementStore, pools: int, since: float, timeout_s: float = 120) -> float | None:
    """Seconds from `since` until every expert has its floor of replicas on `pools` serving pools."""
    deadline = since + timeout_s
    while time.monotonic() < deadline:
        try:
            p = store.get()
            if len(p.pools) == pools and not p.below_floor() and all(is_serving(x.address) for x in p.pools.values()):
                return time.monotonic() - since
        except Exception:  # noqa: BLE001 - Redis stopped or restarting
            pass
        time.sleep(0.2)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp())
    model = home / "tiny"
    write_random_model(model, preset_config("tiny"), seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 1024, (12,), generator=g).tolist() for _ in range(64)]
    expected = [
        r.token_ids for r in Engine.from_dir(model).generate(prompts, SamplingParams(NEW_TOKENS, ignore_eos=True))
    ]
    up = UpProcess(
        model,
        pools=3,
        dispatch="fp32",
        home=home / "home",
        autoscale=True,
        extra=["--replicas-per-expert", "2", "--autoscale-interval-s", "0.5"],
    )
    store = RedisPlacementStore(up.redis)
    report = []
    try:
        load = Load(up.gateway, prompts, expected, args.concurrency).start()
        t0 = time.monotonic()
        time.sleep(args.duration * 0.15)
        killed = time.monotonic()
        os.kill(up.child_pid("pool-id pool-0"), signal.SIGKILL)
        report.append(
            f"pool-0 SIGKILLed at {killed - t0:.0f} s: two replicas of every expert on 3 serving pools again "
            f"after {_fmt(wait_restored(store, 3, killed))}"
        )
        time.sleep(max(0.0, t0 + args.duration * 0.4 - time.monotonic()))
        killed = time.monotonic()
        os.kill(up.child_pid("services.autoscaler"), signal.SIGKILL)
        report.append(
            f"autoscaler SIGKILLed at {killed - t0:.0f} s: placement intact after "
            f"{_fmt(wait_restored(store, 3, killed))}"
        )
        time.sleep(max(0.0, t0 + args.duration * 0.6 - time.monotonic()))
        redis_pid = up.child_pid("redis-server")
        stopped = time.monotonic()
        os.kill(redis_pid, signal.SIGSTOP)
        time.sleep(15)
        os.kill(redis_pid, signal.SIGCONT)
        resumed = time.monotonic()
        report.append(
            f"Redis stopped {stopped - t0:.0f}-{resumed - t0:.0f} s: {load.served_between(stopped, resumed)} "
            f"requests completed meanwhile ({load.served_between(stopped - 15, stopped)} in the 15 s before)"
        )
        time.sleep(max(0.0, t0 + args.duration - time.monotonic()))
        load.stop()
    finally:
        up.stop()
    print(
        f"chaos: {args.concurrency} concurrent greedy streams of {NEW_TOKENS} tokens for {args.duration:.0f} s, "
        "3 pools, 2 replicas per expert, fp32 dispatch"
    )
    print(
        f"requests: {load.ok + load.wrong + load.failed} done, {load.failed} failed, {load.wrong} differing from "
        "the in-process engine"
    )
    for line in report:
        print(line)
    for err in sorted(set(load.errors))[:5]:
        print("error:", err)
    sys.exit(1 if load.failed or load.wrong else 0)


def _fmt(seconds: float | None) -> str:
    return "NOT within 120 s" if seconds is None else f"{seconds:.1f} s"


if __name__ == "__main__":
    main()
