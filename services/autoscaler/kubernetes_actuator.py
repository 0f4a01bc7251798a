"""The autoscaler's Kubernetes side: scaling the expert-pool StatefulSet, and leader election on a Lease.

Scale-up patches the StatefulSet's scale subresource, waits for the new pods (ordinals n..m-1, stable names)
to serve, registers them in the placement and rebalances onto them. Scale-down first drains the pools with the
highest ordinals (re-packing their replicas onto the others, two-phase), then lowers the scale, so no pod is
removed while it still holds the only replica of an expert.

Leader election follows client-go's leaderelection: the holder renews its Lease every `retry_period_s` on a
thread of its own, whatever the autoscaler is doing; it leads only until `renew_deadline_s` after the start of
its last successful renewal, shorter than the lease's duration, so it stops acting before any other replica
may take the lease over (the gap covers an actuation already on the wire and clock skew between nodes). The
actuator and the placement store check leadership right before each patch and publish (leadership.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from services.autoscaler.actuation import add_pools, drain_pools
from services.autoscaler.leadership import Leadership, require_leader
from services.rpc.health import is_serving
from services.state.placement import Pool
from services.state.placement_store import RedisPlacementStore

log = logging.getLogger(__name__)


class KubernetesActuator:
    def __init__(
        self,
        apps: client.AppsV1Api,
        namespace: str,
        statefulset: str,
        store: RedisPlacementStore,
        pool_id_of: Callable[[int], str],
        address_of: Callable[[int], str],
        window_s: float = 30.0,
        grace_s: float = 2.0,
        leadership: Leadership | None = None,
    ):
        self.apps, self.namespace, self.statefulset = apps, namespace, statefulset
        self.store, self.leadership = store, leadership  # with leadership: a LeaderOnlyStore too
        self.pool_id_of, self.address_of = pool_id_of, address_of
        self.window_s, self.grace_s = window_s, grace_s

    def replicas(self) -> int:
        return int(self.apps.read_namespaced_stateful_set_scale(self.statefulset, self.namespace).spec.replicas)

    def _patch_scale(self, replicas: int) -> None:
        require_leader(self.leadership, f"scaling {self.statefulset} to {replicas}")
        self.apps.patch_namespaced_stateful_set_scale(
            self.statefulset, self.namespace, {"spec": {"replicas": replicas}}
        )

    def scale_up(self, replicas: int, timeout_s: float = 600.0) -> None:
        current = self.replicas()
        if replicas <= current:
            return
        self._patch_scale(replicas)
        slots = min(p.slots for p in self.store.get().pools.values())
        deadline = time.monotonic() + timeout_s
        new = []
        for i in range(current, replicas):
            address = self.address_of(i)
            while not is_serving(address):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pool {self.pool_id_of(i)} did not become ready in {timeout_s:.0f}s")
                time.sleep(0.5)
            new.append(Pool(self.pool_id_of(i), address, slots))
        add_pools(self.store, new, self.window_s, self.grace_s)
        log.info("scaled pools %d -> %d", current, replicas)

    def scale_down(self, replicas: int) -> None:
        current = self.replicas()
        if replicas >= current or replicas < 1:
            return
        drain_pools(self.store, {self.pool_id_of(i) for i in range(replicas, current)}, self.window_s, self.grace_s)
        self._patch_scale(replicas)  # only now: the drained pods hold nothing anyone routes to
        log.info("scaled pools %d -> %d", current, replicas)


class LeaseElector:
    """Leader election on a coordination.k8s.io Lease: the holder renews it; others take it once it expires.

    `start()` runs the renewals on a thread; `is_leader()` is what actuations check. Times come from `clock`
    (monotonic); the Lease's own timestamps are wall-clock, as every client of a Lease reads them."""

    def __init__(
        self,
        coordination: client.CoordinationV1Api,
        namespace: str,
        name: str,
        identity: str,
        lease_duration_s: int = 15,
        renew_deadline_s: float | None = None,
        retry_period_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.api, self.namespace, self.name = coordination, namespace, name
        self.identity, self.duration = identity, lease_duration_s
        # client-go's defaults in proportion: 15 s lease, renewed within 10 s, tried every 2 s
        self.renew_deadline = renew_deadline_s if renew_deadline_s is not None else lease_duration_s * 2 / 3
        self.retry_period = retry_period_s if retry_period_s is not None else lease_duration_s * 2 / 15
        if not 0 < self.retry_period < self.renew_deadline < self.duration:
            raise ValueError(
                f"need 0 < retry period ({self.retry_period}) < renew deadline ({self.renew_deadline}) "
                f"< lease duration ({self.duration})"
            )
        self.clock = clock
        self.valid_until = float("-inf")  # on `clock`: leading until then, unless a renewal moves it on
        self.leading_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def is_leader(self) -> bool:
        return self.clock() < self.valid_until

    def start(self) -> LeaseElector:
        self._thread = threading.Thread(target=self._run, name="lease-elector", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing, and give the Lease up if this identity holds it (as client-go's ReleaseOnCancel): the
        next candidate takes it within a second, not after the whole lease duration."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.renew_deadline)
        was_leading, self.valid_until = self.is_leader(), float("-inf")
        if was_leading:
            self.release()

    def release(self) -> bool:
        """Hand the Lease back: no holder, a 1 s duration from now. -> whether it was ours to release."""
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity != self.identity:
                return False
            patch = {"spec": {"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": self._now().isoformat()}}
            if lease.metadata.resource_version:
                patch["metadata"] = {"resourceVersion": lease.metadata.resource_version}
            self.api.patch_namespaced_lease(self.name, self.namespace, patch)
        except Exception as exc:  # noqa: BLE001 - stopping anyway: the Lease then expires on its own
            log.warning("lease %s: could not release it: %s", self.name, exc)
            return False
        log.info("lease %s: %s released it", self.name, self.identity)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            was = self.is_leader()
            try:
                self.try_acquire()
            except Exception as exc:  # noqa: BLE001 - the API server away: leadership lapses at its deadline
                log.warning("lease %s: renewal failed: %s", self.name, exc)
            if was and not self.is_leader():
                log.warning("lease %s: %s lost the leadership", self.name, self.identity)
            self._stop.wait(self.retry_period)

    def try_acquire(self) -> bool:
        """Take or renew the Lease once. True while this identity leads; False drops leadership at once."""
        started = self.clock()  # before the request: the lease runs from no later than this
        leading = self.is_leader()
        if not self._acquire():
            self.valid_until, self.leading_since = float("-inf"), None
            return False
        self.valid_until = started + self.renew_deadline
        if not self.is_leader():  # the renewal took past its deadline
            return False
        if not leading:
            self.leading_since = started
            log.info("lease %s: %s leads", self.name, self.identity)
        return True

    @staticmethod
    def _now() -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def _acquire(self) -> bool:
        now = self._now()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return self._create(now)
        spec = lease.spec
        renewed = spec.renew_time or spec.acquire_time
        if isinstance(renewed, str):
            renewed = dt.datetime.fromisoformat(renewed.replace("Z", "+00:00"))
        expired = renewed is None or (now - renewed).total_seconds() > (spec.lease_duration_seconds or self.duration)
        if spec.holder_identity != self.identity and not expired:
            return False
        patch = {
            "spec": {
                "holderIdentity": self.identity,
                "renewTime": now.isoformat(),
                "leaseDurationSeconds": self.duration,
            }
        }
        if spec.holder_identity != self.identity:
            patch["spec"].update(acquireTime=now.isoformat(), leaseTransitions=(spec.lease_transitions or 0) + 1)
        if lease.metadata.resource_version:  # a real API server: only if nobody wrote it since we read it
            patch["metadata"] = {"resourceVersion": lease.metadata.resource_version}
        try:
            self.api.patch_namespaced_lease(self.name, self.namespace, patch)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def _create(self, now: dt.datetime) -> bool:
        spec = client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=self.duration,
            acquire_time=now,
            renew_time=now,
            lease_transitions=0,
        )
        body = client.V1Lease(metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace), spec=spec)
        try:
            self.api.create_namespaced_lease(self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:  # someone else created it first
                return False
            raise
        return True
