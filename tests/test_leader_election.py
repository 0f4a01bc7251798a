"""Leader election of the autoscaler replicas on a Lease, with the official `kubernetes` client against kmock's
Kubernetes API emulator, which stands in for a real API server (none can run on these machines: see
tests/test_kubernetes_actuator.py). The emulator stores the Lease and the StatefulSet's scale; it does not check
resourceVersion on patches as a real API server does, so these tests never let a stale write through.

A leader whose renewal stalls (its thread blocked in the API call, or its clock past the renew deadline) stops
leading at once, before its Lease expires for the others; another identity takes the Lease once it expires; the
stalled one's actuations are refused from the moment it stopped leading.
"""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from services.autoscaler.kubernetes_actuator import KubernetesActuator, LeaseElector
from services.autoscaler.leadership import LeaderOnlyStore, NotLeaderError
from services.autoscaler.service import Autoscaler
from tests.test_kubernetes_actuator import NS, STS, kube  # noqa: F401 - the emulator fixture
from tests.waiting import wait_until

LEASE = "demo-expertmesh-autoscaler"


def elector(api, identity: str, **kwargs) -> LeaseElector:
    kwargs = {"lease_duration_s": 1, "renew_deadline_s": 0.6, "retry_period_s": 0.1, **kwargs}
    return LeaseElector(client.CoordinationV1Api(api), NS, LEASE, identity, **kwargs)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingStore:
    """A placement store that records what reaches it (no Redis needed to see a publish refused)."""

    def __init__(self):
        self.published = []

    def get(self):
        return None

    def publish(self, placement, expected_version=None):
        self.published.append((placement, expected_version))
        return placement


def statefulset(api, replicas: int = 2):
    apps = client.AppsV1Api(api)
    apps.create_namespaced_stateful_set(
        NS,
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": STS, "namespace": NS},
            "spec": {
                "replicas": replicas,
                "serviceName": "pools",
                "selector": {"matchLabels": {"c": "pool"}},
                "template": {
                    "metadata": {"labels": {"c": "pool"}},
                    "spec": {"containers": [{"name": "p", "image": "x"}]},
                },
            },
        },
    )
    return apps


def actuations(apps, leadership):
    """The two ways an autoscaler changes anything: patch the StatefulSet's scale, publish a placement."""
    inner = RecordingStore()
    store = LeaderOnlyStore(inner, leadership)
    actuator = KubernetesActuator(
        apps, NS, STS, store, lambda i: f"{STS}-{i}", lambda i: f"127.0.0.1:{i}", leadership=leadership
    )
    return actuator, store, inner


def test_a_stalled_renewal_drops_leadership_before_another_takes_over(kube):  # noqa: F811
    apps = statefulset(kube)
    a = elector(kube, "autoscaler-a").start()
    b = elector(kube, "autoscaler-b")
    try:
        wait_until(a.is_leader, 10, "a to lead")
        b.start()
        deadline = time.monotonic() + 1.5  # three lease durations: a keeps renewing on its thread, b never leads
        while time.monotonic() < deadline:
            assert a.is_leader() and not b.is_leader()
            time.sleep(0.05)

        release = threading.Event()

        def hung(*args, **kwargs):  # a's next renewal hangs in the API call (a stalled connection)
            release.wait(30)
            raise ApiException(status=504, reason="renewal timed out")

        a.api.patch_namespaced_lease = hung
        lapsed = wait_until(lambda: not a.is_leader() and time.monotonic(), 5, "a to stop leading")
        assert lapsed <= a.valid_until + 0.5  # at its renew deadline, not when the thread comes back
        actuator, store, inner = actuations(apps, a)
        with pytest.raises(NotLeaderError, match="autoscaler-a"):
            actuator._patch_scale(5)
        with pytest.raises(NotLeaderError):
            store.publish(object(), 3)
        assert actuator.replicas() == 2 and inner.published == []

        wait_until(b.is_leader, 10, "b to take over the expired lease")
        assert b.leading_since > a.valid_until, "b led while a still believed it led"
        holder = client.CoordinationV1Api(kube).read_namespaced_lease(LEASE, NS).spec.holder_identity
        assert holder == "autoscaler-b"
        release.set()  # a's hung call returns (failed); a must not lead again while b renews
        time.sleep(0.5)
        assert not a.is_leader() and b.is_leader()
        with pytest.raises(NotLeaderError):
            actuator._patch_scale(5)
        b_actuator, b_store, b_inner = actuations(apps, b)
        b_actuator._patch_scale(3)
        b_store.publish("placement", 3)
        assert b_actuator.replicas() == 3 and b_inner.published == [("placement", 3)]
    finally:
        a.stop()
        b.stop()


def test_a_clock_past_the_renew_deadline_drops_leadership_at_once(kube):  # noqa: F811
    """The leader's own clock decides: once past its renew deadline it acts no more, though the Lease still
    names it (for the others it expires only later)."""
    apps = statefulset(kube)
    clock = FakeClock()
    a = elector(kube, "autoscaler-a", clock=clock)  # no thread: renewals only when the test asks
    b = elector(kube, "autoscaler-b")
    assert a.try_acquire() and a.is_leader()
    actuator, store, inner = actuations(apps, a)
    actuator._patch_scale(3)
    assert actuator.replicas() == 3
    clock.now += 0.61  # a's process stalled (a long tick, a GC pause, a frozen VM) past the renew deadline
    assert not a.is_leader()
    with pytest.raises(NotLeaderError):
        actuator._patch_scale(4)
    with pytest.raises(NotLeaderError):
        store.publish(object())
    assert actuator.replicas() == 3 and inner.published == []
    assert client.CoordinationV1Api(kube).read_namespaced_lease(LEASE, NS).spec.holder_identity == "autoscaler-a"
    wait_until(b.try_acquire, 10, "b to take the lease once it expires")
    assert a.try_acquire() is False and not a.is_leader()


def test_a_late_renewal_does_not_lead():
    """A renewal that returns after the renew deadline (counted from when it was sent) does not make a leader."""
    clock = FakeClock()
    a = LeaseElector(
        None, NS, LEASE, "autoscaler-a", lease_duration_s=1, renew_deadline_s=0.6, retry_period_s=0.1, clock=clock
    )

    def slow_acquire():
        clock.now += 0.7
        return True

    a._acquire = slow_acquire
    assert a.try_acquire() is False and not a.is_leader()
    a._acquire = lambda: True
    assert a.try_acquire() is True and a.is_leader()


def test_the_autoscaler_ticks_and_publishes_only_while_leading(redis_server):
    """Autoscaler(elector=...) publishes through a LeaderOnlyStore: a rollout started while leading is refused at
    the publish once leadership is gone."""

    class Switch:
        identity, leading = "autoscaler-a", True

        def is_leader(self):
            return self.leading

    switch = Switch()
    autoscaler = Autoscaler(redis_server.url, elector=switch)
    assert isinstance(autoscaler.store, LeaderOnlyStore)
    switch.leading = False
    with pytest.raises(NotLeaderError):
        autoscaler.store.publish(object(), 0)
    assert autoscaler.store.get() is None  # reads pass through


def test_elector_timings_are_checked():
    with pytest.raises(ValueError, match="renew deadline"):
        LeaseElector(None, NS, LEASE, "x", lease_duration_s=15, renew_deadline_s=15)
    default = LeaseElector(None, NS, LEASE, "x")
    assert (default.duration, default.renew_deadline, default.retry_period) == (15, 10, 2)


def test_a_stopping_leader_releases_the_lease_and_another_leads_at_once(kube):  # noqa: F811
    """Stopping (SIGTERM) a leader hands its Lease back (client-go's ReleaseOnCancel): another identity leads
    within a second instead of waiting for the lease to expire; a non-leader's stop leaves the Lease alone."""
    api = kube
    a = elector(api, "a", lease_duration_s=30, renew_deadline_s=20, retry_period_s=0.1).start()
    wait_until(a.is_leader, 5, "a to lead")
    b = elector(api, "b", lease_duration_s=30, renew_deadline_s=20, retry_period_s=0.1).start()
    time.sleep(0.3)
    assert not b.is_leader()  # a's 30 s lease holds
    b.stop()
    lease = client.CoordinationV1Api(api).read_namespaced_lease(LEASE, NS)
    assert lease.spec.holder_identity == "a"  # a non-leader's stop released nothing
    b = elector(api, "b", lease_duration_s=30, renew_deadline_s=20, retry_period_s=0.1).start()
    started = time.monotonic()
    a.stop()
    assert not a.is_leader()
    wait_until(b.is_leader, 5, "b to lead once a released the Lease")
    assert time.monotonic() - started < 3  # not the 30 s of a's lease
    b.stop()
