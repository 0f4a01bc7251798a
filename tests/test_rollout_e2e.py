"""Live placement changes under continuous generation (`expertmesh up`, real processes): three rebalances, a
pool added and another drained, and not one failed request; every output equals the in-process engine's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from typer.testing import CliRunner

from services.cli.app import app
from services.cli.gateway_client import GatewayClient
from services.gateway.sampling import SamplingParams
from services.rpc.processes import free_port
from tests.local_deployment import UpProcess
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]


def test_rebalances_and_pool_changes_under_load(tiny_fp8, tmp_path_factory, engine_tiny):
    up = UpProcess(tiny_fp8, pools=3, dispatch="fp32", home=tmp_path_factory.mktemp("rollout"))
    extra_pool = None
    try:
        g = torch.Generator().manual_seed(9)
        prompts = [torch.randint(2, 1024, (int(n),), generator=g).tolist() for n in (4, 9, 15, 6)]
        expected = {
            i: g.token_ids
            for i, g in enumerate(engine_tiny.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True)))
        }
        failures, outputs, stop = [], [], threading.Event()

        def loop(i):
            client = GatewayClient(up.gateway, timeout_s=60)
            while not stop.is_set():
                try:
                    outputs.append((i, client.generate(None, prompts[i], 10, ignore_eos=True)["token_ids"]))
                except Exception as exc:  # noqa: BLE001 - counted, the test fails on any
                    failures.append(repr(exc))
            client.close()

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        runner = CliRunner()

        def cli(*args):
            result = runner.invoke(app, [*args, "--redis", up.redis])
            assert result.exit_code == 0, result.output
            return result

        def answered_since(mark, times):
            """Whether every client has had `times` answers since outputs[mark]."""
            assert failures == []
            done = [i for i, _ in outputs[mark:]]
            return all(done.count(i) >= times for i in range(len(prompts)))

        wait_until(lambda: answered_since(0, 1), 60, "every client to be answered once")
        # three rebalances: a replica added, one moved, then the planner's placement for the recorded load
        shown = json.loads(cli("placement", "show", "--json").stdout)
        holder = shown["layers"]["1"][3][0]
        others = [p["pool_id"] for p in shown["pools"] if p["pool_id"] != holder]
        cli("placement", "replicate", "--layer", "1", "--expert", "3", "--pool", others[0])
        cli(
            "placement",
            "move",
            "--layer",
            "2",
            "--expert",
            "4",
            "--from",
            shown["layers"]["2"][4][0],
            "--to",
            next(p["pool_id"] for p in shown["pools"] if p["pool_id"] != shown["layers"]["2"][4][0]),
        )
        # a fourth pool joins: started by hand, registered, then filled by a rebalance
        port = free_port()
        extra_pool = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.expert.server",
                "--model",
                str(tiny_fp8),
                "--pool-id",
                "pool-3",
                "--redis",
                up.redis,
                "--port",
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert extra_pool.stdout.readline().startswith("READY")
        cli("pools", "add", f"127.0.0.1:{port}", "--id", "pool-3")
        cli("rebalance", "--window", "600")
        # and one pool drained and removed
        cli("pools", "drain", "pool-0")
        # the last change in use, then two more answers per client (the second one sent after the switch)
        up.wait_rolled_out()
        mark = len(outputs)
        wait_until(lambda: answered_since(mark, 2), 60, "every client to be answered twice after the drain")
        stop.set()
        for t in threads:
            t.join(timeout=60)
        final = json.loads(cli("placement", "show", "--json").stdout)
        assert "pool-0" not in {p["pool_id"] for p in final["pools"]}
        assert any("pool-3" in r for layer in final["layers"].values() for r in layer)  # the new pool serves
        assert failures == []
        assert all(tokens == expected[i] for i, tokens in outputs)
        print(f"\n{len(outputs)} requests during {final['version'] - 1} placement changes, none failed")
    finally:
        if extra_pool is not None:
            extra_pool.terminate()
            extra_pool.wait(10)
        up.stop()
