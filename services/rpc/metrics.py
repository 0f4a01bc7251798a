"""Prometheus metrics of every service.

Request metrics carry vLLM's names without its `vllm:` prefix and its `model_name` label, so a Grafana panel
made for vLLM reads the gateway (with `vllm:` dropped from its queries): `num_requests_running`,
`num_requests_waiting`, `kv_cache_usage_perc` (a fraction, 0 to 1, as vLLM's), `time_to_first_token_seconds`,
`inter_token_latency_seconds`, `e2e_request_latency_seconds`, `prompt_tokens_total`, `generation_tokens_total`
and `request_success_total{finished_reason}`. What is ours keeps the `moe_` prefix: placement, balancedness,
pools, routed tokens, expert RPCs. Units are in the names.

Each process creates the group it serves (`GatewayMetrics`, `PoolMetrics`, `AutoscalerMetrics`) and exposes
them with `serve_metrics(port, host)` on /metrics.
"""

from __future__ import annotations

import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)
# a request waits for admission, prefills and generates: seconds to tens of minutes
REQUEST_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
    640.0,
    1280.0,
    2560.0,
)
# between two tokens: a step, or a step that waited on a pool's failover (tens of seconds)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


class GatewayMetrics:
    """The gateway's metrics. The request ones are bound to one served model (`set_model_name`, done by the
    gateway runtime from GatewayConfig.model_name) and keep the attribute names the gateway code uses."""

    def __init__(self, registry: CollectorRegistry = REGISTRY, model_name: str = ""):
        r, m = registry, ["model_name"]
        self._ttft = Histogram(
            "time_to_first_token_seconds", "Request arrival to its first token.", m, buckets=REQUEST_BUCKETS, registry=r
        )
        self._itl = Histogram(
            "inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            m,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self._e2e = Histogram(
            "e2e_request_latency_seconds",
            "Request arrival to its end (finished, failed or cancelled).",
            m,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self._running = Gauge("num_requests_running", "Requests admitted: prefilling or generating.", m, registry=r)
        self._waiting = Gauge(
            "num_requests_waiting", "Requests waiting for admission (latent-cache space).", m, registry=r
        )
        self._kv_cache_usage = Gauge(
            "kv_cache_usage_perc", "Fraction of latent-cache blocks in use (0 to 1).", m, registry=r
        )
        self._prompt_tokens = Counter(
            "prompt_tokens_total", "Prompt tokens prefilled, counted when a request ends.", m, registry=r
        )
        self._generation_tokens = Counter(
            "generation_tokens_total", "Tokens generated, counted when a request ends.", m, registry=r
        )
        self._prefix_queries = Counter(
            "prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache (generate requests), counted when a request ends.",
            m,
            registry=r,
        )
        self._prefix_hits = Counter(
            "prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache (not computed), counted when a request ends.",
            m,
            registry=r,
        )
        self._preemptions = Counter(
            "num_preemptions_total",
            "Requests preempted (their cache blocks taken for older requests when the cache filled; recomputed).",
            m,
            registry=r,
        )
        self._request_success = Counter(
            "request_success_total",
            "Requests ended, by finished_reason: stop, length, scored (a score request), abort (cancelled), error.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self._add_moe_metrics(r)
        self.set_model_name(model_name)

    def _add_moe_metrics(self, r: CollectorRegistry) -> None:
        """What is expertmesh's own: expert-pool calls, placement, load store, speculative decoding."""
        self.routed_tokens = Counter(
            "moe_routed_tokens_total", "Tokens sent to each expert pool.", ["pool"], registry=r
        )
        self.pool_call = Histogram(
            "moe_expert_rpc_duration_seconds",
            "Expert-pool Forward call duration.",
            ["pool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pool_failures = Counter(
            "moe_expert_rpc_failures_total", "Failed expert-pool calls (re-sent elsewhere).", ["pool"], registry=r
        )
        self.placement_version = Gauge("moe_placement_version", "Placement version in use.", registry=r)
        self.load_store_outage = Gauge(
            "moe_load_store_outage_seconds", "Seconds the load store has been unreachable.", registry=r
        )
        self.load_buckets_dropped = Gauge(
            "moe_load_store_dropped_buckets", "Load buckets dropped during outages.", registry=r
        )
        self.spec_draft_tokens = Counter(
            "moe_spec_decode_draft_tokens", "MTP draft tokens verified (--mtp).", registry=r
        )
        self.spec_accepted_tokens = Counter(
            "moe_spec_decode_accepted_tokens", "MTP draft tokens the main model accepted (--mtp).", registry=r
        )

    def set_model_name(self, model_name: str) -> None:
        """Bind the request metrics to the served model's name (before any request is served); the series of the
        name they had go."""
        previous = getattr(self, "model_name", None)
        if previous is not None and previous != model_name:
            for family in (
                self._ttft,
                self._itl,
                self._e2e,
                self._running,
                self._waiting,
                self._kv_cache_usage,
                self._prompt_tokens,
                self._generation_tokens,
                self._prefix_queries,
                self._prefix_hits,
                self._preemptions,
            ):
                family.remove(previous)
        self.model_name = model_name
        self.ttft = self._ttft.labels(model_name)
        self.itl = self._itl.labels(model_name)
        self.e2e_latency = self._e2e.labels(model_name)
        self.running = self._running.labels(model_name)
        self.waiting = self._waiting.labels(model_name)
        self.kv_cache_usage = self._kv_cache_usage.labels(model_name)
        self.prompt_tokens = self._prompt_tokens.labels(model_name)
        self.generation_tokens = self._generation_tokens.labels(model_name)
        self.prefix_cache_queries = self._prefix_queries.labels(model_name)
        self.prefix_cache_hits = self._prefix_hits.labels(model_name)
        self.preemptions = self._preemptions.labels(model_name)

    def request_success(self, finished_reason: str) -> Counter:
        return self._request_success.labels(self.model_name, finished_reason)

    def request_finished(self, request) -> None:
        """A request leaves the serving core (the scheduler's `on_finish`): its end, its tokens, its latency.
        `request` is a gateway Request: finish_reason, error, cancelled, fed, output, cached_tokens, arrival_time."""
        if request.error is not None:
            reason = "error"
        else:
            reason = request.finish_reason or ("abort" if request.cancelled else "error")
        self.request_success(reason).inc()
        self.prompt_tokens.inc(min(request.fed, len(request.prompt)))  # a recomputed output is not prompt
        if request.fed and not request.is_score:  # admitted: its prompt was looked up in the prefix cache
            self.prefix_cache_queries.inc(len(request.prompt))
            self.prefix_cache_hits.inc(request.cached_tokens)
        self.generation_tokens.inc(len(request.output))
        self.e2e_latency.observe(time.monotonic() - request.arrival_time)


class PoolMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        r = registry
        self.forward = Histogram(
            "moe_pool_forward_duration_seconds",
            "Forward handling time on the pool.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.routed_pairs = Counter("moe_pool_routed_pairs_total", "(token, expert) pairs computed.", registry=r)
        self.experts_loaded = Gauge("moe_pool_experts_loaded", "(layer, expert) replicas held.", registry=r)
        self.weight_bytes = Gauge(
            "moe_pool_weight_bytes", "Bytes of expert weights held: FP8 ones and any dense copies.", registry=r
        )


class AutoscalerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        r = registry
        self.balancedness = Gauge(
            "moe_placement_balancedness", "Mean / max pool load over the load window.", registry=r
        )
        self.rebalances = Counter("moe_rebalances_total", "Placement rollouts.", ["reason"], registry=r)
        self.rebalance_duration = Histogram(
            "moe_rebalance_duration_seconds",
            "Two-phase rollout duration.",
            buckets=(0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.placement_version = Gauge("moe_placement_version", "Placement version committed.", registry=r)
        self.below_replica_floor = Gauge(
            "moe_experts_below_replica_floor",
            "(layer, expert) pairs with fewer replicas than the placement's floor.",
            registry=r,
        )


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Expose the default registry on http://host:port/metrics (0: disabled). Returns the port."""
    if port:
        start_http_server(port, addr=host)
    return port
