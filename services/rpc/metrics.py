"""Prometheus metrics of every service, named like vLLM's with a `moe_` prefix and units in the names.

Each process creates the group it serves (`GatewayMetrics`, `PoolMetrics`, `AutoscalerMetrics`) and exposes
them with `serve_metrics(port)` on /metrics.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        r = registry
        self.ttft = Histogram("moe_gateway_time_to_first_token_seconds", "Request arrival to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("moe_gateway_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("moe_gateway_requests_running", "Requests being generated.", registry=r)
        self.waiting = Gauge("moe_gateway_requests_waiting", "Requests waiting for cache space.", registry=r)
        self.kv_cache_usage = Gauge("moe_gateway_kv_cache_usage_ratio", "Fraction of latent-cache blocks in use.", registry=r)
        self.routed_tokens = Counter("moe_routed_tokens_total", "Tokens sent to each expert pool.", ["pool"], registry=r)
        self.pool_call = Histogram("moe_expert_rpc_duration_seconds", "Expert-pool Forward call duration.", ["pool"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.pool_failures = Counter("moe_expert_rpc_failures_total", "Failed expert-pool calls (re-sent elsewhere).",
                                     ["pool"], registry=r)
        self.placement_version = Gauge("moe_placement_version", "Placement version in use.", registry=r)
        self.load_store_outage = Gauge("moe_load_store_outage_seconds", "Seconds the load store has been unreachable.",
                                       registry=r)
        self.load_buckets_dropped = Gauge("moe_load_store_dropped_buckets", "Load buckets dropped during outages.",
                                          registry=r)


class PoolMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        r = registry
        self.forward = Histogram("moe_pool_forward_duration_seconds", "Forward handling time on the pool.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.routed_pairs = Counter("moe_pool_routed_pairs_total", "(token, expert) pairs computed.", registry=r)
        self.experts_loaded = Gauge("moe_pool_experts_loaded", "(layer, expert) replicas held.", registry=r)
        self.weight_bytes = Gauge("moe_pool_weight_bytes", "Bytes of FP8 expert weights held.", registry=r)


class AutoscalerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        r = registry
        self.balancedness = Gauge("moe_placement_balancedness", "Mean / max pool load over the load window.", registry=r)
        self.rebalances = Counter("moe_rebalances_total", "Placement rollouts.", ["reason"], registry=r)
        self.rebalance_duration = Histogram("moe_rebalance_duration_seconds", "Two-phase rollout duration.",
                                            buckets=(0.5, 1, 2, 4, 8, 16, 32, 64), registry=r)
        self.placement_version = Gauge("moe_placement_version", "Placement version committed.", registry=r)
        self.below_replica_floor = Gauge("moe_experts_below_replica_floor",
                                         "(layer, expert) pairs with fewer replicas than the placement's floor.",
                                         registry=r)


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Expose the default registry on http://host:port/metrics (0: disabled). Returns the port."""
    if port:
        start_http_server(port, addr=host)
    return port
