"""The autoscaler: every interval it reads the load window, measures pool balancedness, and re-places.

- Dead pools (health check fails) are taken out of the placement at once: their experts are re-packed onto
  the live pools (failover re-placement).
- Below `rebalance_threshold` balancedness, and no sooner than `rebalance_min_interval_s` after the last
  rebalance, it plans for
  the window's load and rolls the plan out in two phases, if the plan improves balancedness by at least
  `hysteresis` (so it does not flap on noise).

- With an actuator (Kubernetes: `kubernetes_actuator.py`) and a pool capacity, utilisation (routed tokens/s per
  pool over the capacity) above or below thresholds for `scale_patience` ticks asks for one pool more or
  fewer, within [min_pools, max_pools]. With an elector, only the Lease holder acts: it ticks only while it
  leads, and every placement publish and StatefulSet patch checks leadership again right before it goes out.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time

import numpy as np

from services.autoscaler.actuation import without_pools
from services.autoscaler.config import AutoscalerConfig
from services.autoscaler.leadership import LeaderOnlyStore
from services.autoscaler.rebalance import propose
from services.autoscaler.rollout import RolloutResult, rollout
from services.errors import ExpertmeshError
from services.math.device import DEVICE_CHOICES
from services.rpc import tls
from services.rpc.health import is_serving
from services.rpc.metrics import AutoscalerMetrics, serve_metrics
from services.settings import add_flags, from_flags
from services.state.load_store import RedisLoadStore
from services.state.placement import Placement
from services.state.placement_store import RedisPlacementStore

log = logging.getLogger(__name__)


class Autoscaler:
    def __init__(
        self,
        redis_url: str,
        config: AutoscalerConfig | None = None,
        metrics: AutoscalerMetrics | None = None,
        actuator=None,
        elector=None,
    ):
        self.config = config or AutoscalerConfig()
        self.metrics = metrics
        self.actuator = actuator
        self.elector = elector
        self._pressure = 0  # consecutive ticks above (+) or below (-) the utilisation thresholds
        store = RedisPlacementStore(redis_url)
        self.store = LeaderOnlyStore(store, elector) if elector is not None else store
        self.redis_url = redis_url
        self.last_rebalance = float("-inf")
        self.rebalances = 0
        self.last_balancedness: float | None = None

    def tick(self) -> RolloutResult | None:
        cfg = self.config
        placement = self.store.get()
        if placement is None:
            return None
        load = RedisLoadStore.from_url(self.redis_url, placement.layers, placement.num_experts).window(
            cfg.load_window_s
        )
        dead = {p for p, pool in placement.pools.items() if not is_serving(pool.address)}
        if dead and len(dead) < len(placement.pools):
            log.warning("pools %s are down: re-placing their experts", sorted(dead))
            plan_load = load + 1 if load.sum() == 0 else load
            return self._roll(propose(without_pools(placement, dead), plan_load).proposed, placement, "failover")
        if self._scale(placement, load):
            return None
        restored = self._keep_floor(placement, load)
        if restored is not None:
            return restored
        by_layer = {l: load[i].tolist() for i, l in enumerate(placement.layers)}
        self.last_balancedness = placement.balancedness(by_layer)
        if self.metrics:
            self.metrics.balancedness.set(self.last_balancedness)
            self.metrics.placement_version.set(placement.version)
        if load.sum() < cfg.min_tokens or self.last_balancedness >= cfg.rebalance_threshold:
            return None
        if time.monotonic() - self.last_rebalance < cfg.rebalance_min_interval_s:
            return None
        proposal = propose(placement, np.asarray(load, dtype=np.float64))
        if proposal.balancedness_after < self.last_balancedness + cfg.hysteresis:
            return None
        log.info(
            "balancedness %.3f below %.2f: rebalancing to %.3f (%d replicas to load)",
            self.last_balancedness,
            cfg.rebalance_threshold,
            proposal.balancedness_after,
            proposal.moves,
        )
        return self._roll(proposal.proposed, placement, "rebalance")

    def _keep_floor(self, placement: Placement, load: np.ndarray) -> RolloutResult | None:
        """Experts below the replica floor (pools were lost): say so, and re-place as soon as capacity allows."""
        short = placement.below_floor()
        if self.metrics:
            self.metrics.below_replica_floor.set(len(short))
        if not short:
            return None
        proposal = propose(placement, load + 1 if load.sum() == 0 else np.asarray(load, dtype=np.float64))
        still = len(proposal.proposed.below_floor())
        if still >= len(short):
            log.warning(
                "%d experts have fewer than %d replicas and the pools have no room for more (%d pools)",
                len(short),
                placement.min_replicas,
                len(placement.pools),
            )
            return None
        log.info(
            "restoring the replica floor of %d: %d experts below it, %d after",
            placement.min_replicas,
            len(short),
            still,
        )
        return self._roll(proposal.proposed, placement, "redundancy")

    def _scale(self, placement: Placement, load: np.ndarray) -> bool:
        """Ask the actuator for one pool more or fewer when utilisation stays beyond a threshold."""
        cfg = self.config
        if self.actuator is None or cfg.pool_capacity <= 0:
            return False
        pools = len(placement.pools)
        per_layer = load.sum() / max(1, len(placement.layers))  # tokens routed per layer in the window
        utilisation = per_layer / cfg.load_window_s / pools / cfg.pool_capacity
        if utilisation > cfg.scale_up_above and pools < cfg.max_pools:
            self._pressure = max(self._pressure, 0) + 1
        elif utilisation < cfg.scale_down_below and pools > cfg.min_pools:
            self._pressure = min(self._pressure, 0) - 1
        else:
            self._pressure = 0
        if abs(self._pressure) < cfg.scale_patience:
            return False
        target = pools + (1 if self._pressure > 0 else -1)
        log.info("pool utilisation %.2f: scaling %d -> %d pools", utilisation, pools, target)
        self._pressure = 0
        try:
            (self.actuator.scale_up if target > pools else self.actuator.scale_down)(target)
        except Exception as exc:  # noqa: BLE001 - next tick tries again
            log.warning("scaling to %d pools failed: %s", target, exc)
        return True

    def _roll(self, new: Placement, old: Placement, why: str) -> RolloutResult | None:
        try:
            result = rollout(self.store, new, old.version, grace_s=self.config.grace_s)
        except ExpertmeshError as exc:  # a concurrent change (admin CLI) or a pool failing mid-rollout: next tick
            log.warning("%s rollout abandoned: %s", why, exc)
            return None
        self.last_rebalance = time.monotonic()
        self.rebalances += 1
        if self.metrics:
            self.metrics.rebalances.labels(why).inc()
            self.metrics.rebalance_duration.observe(result.seconds)
            self.metrics.placement_version.set(result.version)
        log.info(
            "%s: placement version %d in %.2f s (%d loads, %d unloads)",
            why,
            result.version,
            result.seconds,
            result.loaded,
            result.unloaded,
        )
        return result

    def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                if self.elector is None or self.elector.is_leader():  # renewed on the elector's own thread
                    self.tick()
            except Exception:  # noqa: BLE001 - Redis or a pool away: try again next interval
                log.exception("autoscaler tick failed")
            time.sleep(max(0.0, self.config.autoscale_interval_s - (time.monotonic() - started)))


def bootstrap(
    store: RedisPlacementStore,
    model_dir: str,
    pools: list[tuple[str, str]],
    slots_per_pool: int = 0,
    replicas: int = 1,
    timeout_s: float = 600.0,
) -> Placement | None:
    """With no placement in Redis yet (a fresh cluster): spread the experts over the (pool id, address) pools,
    have each pool load its share once it serves, then publish version 1. Does nothing if one exists."""
    from services.autoscaler.rollout import load_on_pool
    from services.format.config import ModelConfig
    from services.state.placement import Pool, default_slots

    if store.get() is not None:
        return None
    cfg = ModelConfig.from_file(model_dir)
    slots = slots_per_pool or default_slots(cfg.n_routed_experts, replicas, len(pools))
    pool_list = [Pool(pool_id, address, slots) for pool_id, address in pools]
    placement = Placement.spread(cfg, pool_list, replicas=replicas)
    deadline = time.monotonic() + timeout_s
    for pool in pool_list:
        while not is_serving(pool.address):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pool {pool.pool_id} at {pool.address} did not come up")
            time.sleep(1.0)
        load_on_pool(pool.address, set(placement.experts_on(pool.pool_id)), timeout_s)
    return store.publish(placement, expected_version=0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="expertmesh-autoscaler", description="expertmesh autoscaler")
    ap.add_argument("--redis", required=True)
    ap.add_argument("--model", help="checkpoint directory (for --bootstrap-pools)")
    ap.add_argument(
        "--bootstrap-pools",
        type=int,
        default=0,
        help="with no placement yet, spread the experts over this many pools and publish it",
    )
    ap.add_argument("--pool-id-template", default="pool-{i}")
    ap.add_argument("--pool-address-template", default="127.0.0.1:{i}")
    ap.add_argument("--slots-per-pool", type=int, default=0)
    ap.add_argument("--replicas-per-expert", type=int, default=1)
    ap.add_argument(
        "--kubernetes", action="store_true", help="in a cluster: scale the pool StatefulSet, elect a leader"
    )
    ap.add_argument("--local-pools", action="store_true", help="scale pools as local processes (expertmesh up)")
    ap.add_argument("--pool-threads", type=int, default=1)
    ap.add_argument(
        "--pool-device", default="auto", choices=DEVICE_CHOICES, help="the device of the pools it starts locally"
    )
    ap.add_argument("--log-dir", help="where local pool processes log")
    ap.add_argument("--statefulset", help="the pool StatefulSet (with --kubernetes)")
    ap.add_argument("--lease", help="the Lease for leader election (with --kubernetes)")
    ap.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    ap.add_argument("--identity", default=os.environ.get("POD_NAME", socket.gethostname()))
    ap.add_argument("--host", default="127.0.0.1", help="address /metrics listens on (0.0.0.0 in a pod)")
    ap.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    ap.add_argument("--tls-dir", help="mutual TLS to the pools: ca.crt, tls.crt, tls.key (default $EXPERTMESH_TLS_DIR)")
    add_flags(ap, AutoscalerConfig)
    return ap


def _kubernetes(args, config: AutoscalerConfig):
    """In a cluster: the elector (renewing on its own thread from now on) and the StatefulSet actuator."""
    from kubernetes import client
    from kubernetes import config as kube_config

    from services.autoscaler.kubernetes_actuator import KubernetesActuator, LeaseElector

    kube_config.load_incluster_config()
    elector = LeaseElector(
        client.CoordinationV1Api(), args.namespace, args.lease or "expertmesh-autoscaler", args.identity
    ).start()
    actuator = KubernetesActuator(
        client.AppsV1Api(),
        args.namespace,
        args.statefulset,
        LeaderOnlyStore(RedisPlacementStore(args.redis), elector),
        lambda i: args.pool_id_template.format(i=i),
        lambda i: args.pool_address_template.format(i=i),
        config.load_window_s,
        config.grace_s,
        leadership=elector,
    )
    return actuator, elector


def _bootstrap(args, elector) -> None:
    """Only the leader bootstraps; the others wait until it has (or until they lead)."""
    if not args.model:
        sys.exit("expertmesh autoscaler: --bootstrap-pools needs --model")
    store = RedisPlacementStore(args.redis)
    while elector is not None and not elector.is_leader():
        if store.get() is not None:
            return
        time.sleep(1.0)
    pools = [
        (args.pool_id_template.format(i=i), args.pool_address_template.format(i=i)) for i in range(args.bootstrap_pools)
    ]  # StatefulSet ordinals: stable names
    store = LeaderOnlyStore(store, elector) if elector is not None else store
    bootstrap(store, args.model, pools, args.slots_per_pool, args.replicas_per_expert)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        tls.configure(args.tls_dir)
    except ExpertmeshError as exc:
        sys.exit(f"expertmesh autoscaler: {exc}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    config = from_flags(AutoscalerConfig, args)
    serve_metrics(args.metrics_port, args.host)
    actuator = elector = None
    if args.kubernetes:
        actuator, elector = _kubernetes(args, config)
    if args.bootstrap_pools:
        _bootstrap(args, elector)
    if args.local_pools:
        if not args.model:
            sys.exit("expertmesh autoscaler: --local-pools needs --model")
        from pathlib import Path

        from services.autoscaler.local_actuator import LocalActuator

        actuator = LocalActuator(
            RedisPlacementStore(args.redis),
            args.model,
            args.pool_threads,
            config.load_window_s,
            config.grace_s,
            Path(args.log_dir) if args.log_dir else None,
            args.pool_device,
        )
    _release_on_sigterm(elector)
    try:
        Autoscaler(args.redis, config, AutoscalerMetrics(), actuator, elector).run()
    except KeyboardInterrupt:  # SIGTERM (below) or Ctrl-C
        pass
    finally:
        if elector is not None:
            elector.stop()  # a leader hands its Lease back: the next replica leads within a second


def _release_on_sigterm(elector) -> None:
    """SIGTERM (a pod's stop, `expertmesh up` stopping) ends the loop like Ctrl-C, so the Lease is released."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    main()
