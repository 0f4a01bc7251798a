"""Autoscaler bootstrap on a fresh cluster: pools that start with no placement get their share loaded, then
version 1 is published (real pool processes on 127.0.0.1 and a real redis-server)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.autoscaler.service import bootstrap
from services.cli.pools_commands import pool_status
from services.rpc.processes import free_port
from services.state.placement_store import RedisPlacementStore

pytestmark = pytest.mark.slow  # real pool processes and redis-server


def test_bootstrap_spreads_experts_over_fresh_pools(redis_server, tiny_fp8):
    pools = [(f"pools-{i}", f"127.0.0.1:{free_port()}") for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.expert.server",
                "--model",
                str(tiny_fp8),
                "--pool-id",
                pool_id,
                "--redis",
                redis_server.url,
                "--port",
                address.rsplit(":", 1)[1],
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for pool_id, address in pools
    ]
    try:
        for p in procs:
            assert p.stdout.readline().startswith("READY")  # serving, holding nothing yet
        store = RedisPlacementStore(redis_server.url)
        placement = bootstrap(store, str(tiny_fp8), pools, timeout_s=60)
        assert placement.version == 1 and store.version() == 1
        assert bootstrap(store, str(tiny_fp8), pools) is None  # only on a fresh cluster
        for pool_id, address in pools:
            status = pool_status(address)
            assert status["health"] == "SERVING"
            assert status["experts_loaded"] == len(placement.experts_on(pool_id)) > 0
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
