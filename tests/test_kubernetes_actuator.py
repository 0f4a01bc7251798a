"""The autoscaler's Kubernetes actuator and leader election, with the official `kubernetes` client against
kmock's Kubernetes API emulator.

No real API server can run on these machines (no kube-apiserver, kind or k3s without downloads), so kmock's
in-memory emulator stands in for it: it stores objects and serves the scale subresource and Leases, but runs
no controllers. The test plays the StatefulSet controller itself: a thread starts a real expert-pool process
for every ordinal the StatefulSet's replicas ask for. Pools, Redis and the rollouts are real.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import kmock
import pytest
from kubernetes import client

from services.autoscaler.kubernetes_actuator import KubernetesActuator, LeaseElector
from services.autoscaler.service import bootstrap
from services.rpc.processes import free_port
from services.state.placement_store import RedisPlacementStore
from tests.waiting import wait_until

NS, STS = "serving", "demo-expertmesh-pools"


@pytest.fixture
def kube():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        emulator = kmock.KubernetesEmulator()
        await emulator.__aenter__()
        server = kmock.Server(emulator)
        await server.__aenter__()
        return emulator, server

    emulator, server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    config = client.Configuration()
    config.host = str(server.url).rstrip("/")
    api = client.ApiClient(config)
    yield api
    api.close()

    async def stop():
        await server.__aexit__(None, None, None)
        await emulator.__aexit__(None, None, None)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


class FakeStatefulSetController:
    """Starts a real pool process for each ordinal below the StatefulSet's replicas (what Kubernetes would do)."""

    def __init__(self, apps, model, redis_url, ports):
        self.apps, self.model, self.redis_url, self.ports = apps, model, redis_url, ports
        self.procs: dict[int, subprocess.Popen] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.1):
            replicas = self.apps.read_namespaced_stateful_set_scale(STS, NS).spec.replicas
            for i in range(replicas):
                if i not in self.procs:
                    self.procs[i] = subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "services.expert.server",
                            "--model",
                            str(self.model),
                            "--pool-id",
                            f"{STS}-{i}",
                            "--redis",
                            self.redis_url,
                            "--port",
                            str(self.ports[i]),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
            for i in [i for i in self.procs if i >= replicas]:
                self.procs.pop(i).terminate()

    def stop(self):
        self._stop.set()
        self.thread.join(5)
        for p in self.procs.values():
            p.terminate()
            p.wait(10)


@pytest.mark.slow  # real pool processes and redis-server
def test_scale_up_then_drain_then_scale_down(kube, redis_server, tiny_fp8):
    apps = client.AppsV1Api(kube)
    apps.create_namespaced_stateful_set(
        NS,
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": STS, "namespace": NS},
            "spec": {
                "replicas": 2,
                "serviceName": "pools",
                "selector": {"matchLabels": {"c": "pool"}},
                "template": {
                    "metadata": {"labels": {"c": "pool"}},
                    "spec": {"containers": [{"name": "p", "image": "x"}]},
                },
            },
        },
    )
    ports = [free_port() for _ in range(3)]
    controller = FakeStatefulSetController(apps, tiny_fp8, redis_server.url, ports)
    controller.thread.start()
    try:
        store = RedisPlacementStore(redis_server.url)
        bootstrap(store, str(tiny_fp8), [(f"{STS}-{i}", f"127.0.0.1:{ports[i]}") for i in range(2)], timeout_s=60)
        actuator = KubernetesActuator(
            apps, NS, STS, store, lambda i: f"{STS}-{i}", lambda i: f"127.0.0.1:{ports[i]}", grace_s=0.2
        )
        actuator.scale_up(3, timeout_s=60)
        assert actuator.replicas() == 3
        placement = store.get()
        assert f"{STS}-2" in placement.pools
        assert placement.experts_on(f"{STS}-2"), "the new pool got no experts"

        seen_at_patch = []
        real_patch = actuator._patch_scale
        actuator._patch_scale = lambda n: (seen_at_patch.append(store.get()), real_patch(n))
        actuator.scale_down(2)
        assert actuator.replicas() == 2
        drained = seen_at_patch[0]
        assert f"{STS}-2" not in drained.pools  # drained before the scale went down
        assert all(r for layer in drained.layers for r in drained.replicas[layer])  # every expert kept a replica
    finally:
        controller.stop()


def test_leader_election_on_a_lease(kube):
    coordination = client.CoordinationV1Api(kube)
    a = LeaseElector(coordination, NS, "demo-expertmesh-autoscaler", "autoscaler-a", lease_duration_s=1)
    b = LeaseElector(coordination, NS, "demo-expertmesh-autoscaler", "autoscaler-b", lease_duration_s=1)
    assert a.try_acquire() is True
    assert b.try_acquire() is False
    for _ in range(3):  # a keeps renewing: b never gets it
        time.sleep(0.4)
        renewed = time.monotonic()
        assert a.try_acquire() is True
        assert b.try_acquire() is False
    # a stops renewing (crashed): the lease expires and b takes over, not before
    wait_until(b.try_acquire, 30, "b to take over the expired lease")
    assert time.monotonic() - renewed > 1
    assert a.try_acquire() is False
    lease = coordination.read_namespaced_lease("demo-expertmesh-autoscaler", NS)
    assert lease.spec.holder_identity == "autoscaler-b"
