"""`expertmesh up` keeps its children alive (real processes, a real redis-server): a SIGKILLed Redis comes back on
its port with the placement, a SIGKILLed pool comes back and serves its experts, a SIGKILLed autoscaler comes
back; requests served after each are exact."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from services.cli.gateway_client import GatewayClient
from services.gateway.sampling import SamplingParams
from services.rpc.health import is_serving
from services.state.placement_store import RedisPlacementStore
from tests.local_deployment import UpProcess
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]
PROMPT = [5, 17, 300, 42, 7]


def _pid(up: UpProcess, pattern: str) -> int | None:
    try:
        return up.child_pid(pattern)
    except (IndexError, ValueError):
        return None


def _restarted(up: UpProcess, pattern: str, old: int) -> int:
    return wait_until(lambda: (p := _pid(up, pattern)) not in (None, old) and p, 30, f"{pattern} to be restarted")


def test_crashed_children_are_restarted_and_serving_goes_on(tiny_fp8, tmp_path, engine_tiny):
    up = UpProcess(
        tiny_fp8, pools=2, dispatch="fp32", home=tmp_path, autoscale=True, extra=["--autoscale-interval-s", "0.5"]
    )
    try:
        want = engine_tiny.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
        client = GatewayClient(up.gateway, timeout_s=60)
        store = RedisPlacementStore(up.redis)
        version = store.version()

        old = up.child_pid("redis-server")
        os.kill(old, signal.SIGKILL)
        _restarted(up, "redis-server", old)
        assert wait_until(lambda: store.version() if _answers(store) else None, 30, "Redis to answer") >= version
        assert client.generate(None, PROMPT, 8, ignore_eos=True)["token_ids"] == want

        old = up.child_pid("pool-id pool-0")
        os.kill(old, signal.SIGKILL)
        _restarted(up, "pool-id pool-0", old)
        address = store.get().pools["pool-0"].address if "pool-0" in store.get().pools else None
        wait_until(
            lambda: "pool-0" in store.get().pools and is_serving(store.get().pools["pool-0"].address),
            60,
            "pool-0 to serve and be in the placement again",
        )
        assert address is None or address == store.get().pools["pool-0"].address
        assert client.generate(None, PROMPT, 8, ignore_eos=True)["token_ids"] == want

        old = up.child_pid("services.autoscaler")
        os.kill(old, signal.SIGKILL)
        _restarted(up, "services.autoscaler", old)
        assert client.generate(None, PROMPT, 8, ignore_eos=True)["token_ids"] == want
        client.close()
        assert up.proc.poll() is None  # up itself carried on throughout
    finally:
        up.stop()
    output = "".join(up.lines)
    assert output.count("restarting in") >= 3, output[-3000:]


def _answers(store: RedisPlacementStore) -> bool:
    try:
        store.version()
        return True
    except Exception:  # noqa: BLE001 - still restarting
        return False
