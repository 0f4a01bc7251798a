"""Starting `expertmesh up` as a child process and reading its endpoints (end-to-end tests, benchmarks)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def metric(url: str, name: str) -> float:
    """One sample of a Prometheus /metrics endpoint: `name` with its labels as exported, e.g.
    'moe_routed_tokens_total{pool="pool-0"}'; a bare name that is exported only with labels is the sum over its
    label sets (the gateway's 'num_requests_running{model_name="..."}' read as 'num_requests_running')."""
    lines = urllib.request.urlopen(url, timeout=5).read().decode().splitlines()
    for line in lines:
        if line.startswith(name + " "):
            return float(line.split()[-1])
    labelled = [float(line.split()[-1]) for line in lines if "{" not in name and line.startswith(name + "{")]
    if labelled:
        return sum(labelled)
    raise AssertionError(f"{name} is not exported at {url}")


class UpProcess:
    def __init__(
        self,
        model: Path,
        pools: int,
        dispatch: str,
        home: Path,
        extra: list[str] | None = None,
        cache_tokens: int = 8192,
        autoscale: bool = False,
        env: dict[str, str] | None = None,
    ):
        """`env`: variables set for `up` and the services it starts, over this process's environment."""
        env = dict(os.environ, **(env or {}), EXPERTMESH_HOME=str(home), PYTHONUNBUFFERED="1")
        self.home = home
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli.app",
                "up",
                "--model",
                str(model),
                "--pools",
                str(pools),
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                "--dispatch-dtype",
                dispatch,
                "--cache-tokens",
                str(cache_tokens),
                "--autoscale" if autoscale else "--no-autoscale",
                *(extra or []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.endpoints: dict[str, str] = {}
        deadline = time.monotonic() + 180
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.match(r"(\S+)\s+(grpc://|redis://|http://)(\S+)", line)
            if m:
                self.endpoints[m.group(1)] = m.group(3) if m.group(2) == "grpc://" else m.group(2) + m.group(3)
            if line.startswith("ready"):
                break
            if time.monotonic() > deadline:
                break
        if "gateway" not in self.endpoints:
            self.stop()
            raise RuntimeError("expertmesh up did not start:\n" + "".join(self.lines) + self.logs())

    @property
    def gateway(self) -> str:
        return self.endpoints["gateway"]

    @property
    def http(self) -> str:
        """The OpenAI-compatible API's base URL, http://127.0.0.1:PORT/v1."""
        return self.endpoints["http"]

    @property
    def redis(self) -> str:
        return self.endpoints["redis"]

    def metrics_url(self, process: str) -> str:
        """/metrics of one process of the deployment: "gateway", "autoscaler" or a pool id started by `up`."""
        return json.loads((self.home / "up.json").read_text())["metrics"][process]

    def metric(self, process: str, name: str) -> float:
        return metric(self.metrics_url(process), name)

    def poke(self) -> None:
        """A one-token request. The gateway switches to a newer placement it has seen at a step boundary, so an
        idle gateway switches only when something makes it step. It may fail (the placement it still uses may name
        a dead pool); it made the gateway step all the same."""
        import grpc

        from services.cli.gateway_client import GatewayClient

        client = GatewayClient(self.gateway, timeout_s=60)
        try:
            client.generate(None, [5], 1, ignore_eos=True)
        except grpc.RpcError:
            pass
        finally:
            client.close()

    def gateway_on(self, version: int) -> bool:
        """Whether the gateway serves placement `version` or a later one, poking it to step if not yet."""
        if self.metric("gateway", "moe_placement_version") >= version:
            return True
        self.poke()
        return self.metric("gateway", "moe_placement_version") >= version

    def wait_gateway_on(self, version: int, timeout_s: float = 30) -> None:
        """Wait until the gateway has switched to placement `version` (it follows the stored version)."""
        from tests.waiting import wait_until

        wait_until(
            lambda: self.gateway_on(version),
            timeout_s,
            f"the gateway to switch to placement version {version}",
            interval_s=0.1,
        )

    def wait_rolled_out(self, timeout_s: float = 60):
        """Wait until a rollout has finished: every pool of the stored placement holds exactly its share (old
        replicas dropped after the grace) and the gateway serves that version. Returns the placement."""
        from services.state.placement_store import RedisPlacementStore
        from tests.waiting import wait_until

        store = RedisPlacementStore(self.redis)

        def finished():
            placement = store.get()
            for pool_id, pool in placement.pools.items():
                if held_experts(pool.address) != set(placement.experts_on(pool_id)):
                    return None
            return placement if self.gateway_on(placement.version) else None

        return wait_until(
            finished, timeout_s, "the placement rollout to finish on every pool and the gateway", interval_s=0.1
        )

    def routed_pairs(self, layer: int = 1) -> int:
        """The (token, expert) pairs of one MoE layer that Redis holds for the last hour (the gateway's counts)."""
        from services.cli.load_commands import load_report

        report = load_report(self.redis, 3600, layer=layer, limit=1 << 20)
        return sum(e["tokens"] for e in report["experts"])

    def settled_routed_pairs(self, layer: int = 1, timeout_s: float = 30) -> int:
        """routed_pairs once the gateway has flushed what it counted (no change over four of its 0.25 s flushes)."""
        from tests.waiting import wait_until_stable

        return wait_until_stable(
            lambda: self.routed_pairs(layer), 1.0, timeout_s, "the gateway's routed-token counts in Redis to settle"
        )

    def logs(self) -> str:
        out = []
        for log in sorted((self.home / "logs").rglob("*.log")):
            out.append(f"--- {log.name}\n" + log.read_text()[-3000:])
        return "\n".join(out)

    def child_pids(self) -> list[int]:
        try:
            out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        except FileNotFoundError:
            return []
        return [int(x) for x in out.split()]

    def child_pid(self, pattern: str) -> int:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", pattern], capture_output=True, text=True).stdout
        return int(out.split()[0])

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
            self.lines.append(rest or "")
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode


def held_experts(address: str) -> set[tuple[int, int]] | None:
    """The (layer, expert) replicas a pool holds (its GetStatus), or None when it does not answer."""
    import grpc

    from expertmesh.v1 import expert_pool_pb2, expert_pool_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            status = expert_pool_pb2_grpc.ExpertPoolServiceStub(channel).GetStatus(
                expert_pool_pb2.GetStatusRequest(), timeout=5
            )
        except grpc.RpcError:
            return None
    return {(r.layer, r.expert) for r in status.experts}
