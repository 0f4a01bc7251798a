"""The gateway's request metrics under vLLM's names: the scheduler tells `on_finish` of every request that
leaves, and GatewayMetrics counts its end (finished_reason), its prompt and generated tokens and its end-to-end
latency, labelled with the served model's name. Also: the Grafana dashboard the chart ships queries only
metrics that the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from services.attention.kv_cache import PagedLatentCache
from services.errors import PoolUnavailableError
from services.format.presets import preset_config
from services.gateway.requests import Request
from services.gateway.sampling import SamplingParams
from services.gateway.scheduler import ChunkResult, Scheduler
from services.rpc.metrics import AutoscalerMetrics, GatewayMetrics, PoolMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "charts" / "expertmesh" / "dashboards" / "expertmesh.json"
VLLM_NAMES = [
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_usage_perc",
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "prompt_tokens_total",
    "generation_tokens_total",
    "request_success_total",
    "num_preemptions_total",
]


@pytest.fixture
def metered():
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry, model_name="DeepSeek-V3")
    cache = PagedLatentCache(preset_config("tiny"), num_blocks=16, block_size=16)
    sched = Scheduler(cache, eos_token_ids=(1,))
    sched.on_finish = metrics.request_finished
    return sched, registry


def _value(registry, name, **labels):
    return registry.get_sample_value(name, {"model_name": "DeepSeek-V3", **labels}) or 0.0


def _run(sched, token=7):
    while plan := sched.plan():
        sched.commit(plan, [ChunkResult(token=token if c.samples else None) for c in plan.chunks])


def test_finished_requests_are_counted_by_reason_with_their_tokens(metered):
    sched, registry = metered
    sched.submit(Request(list(range(2, 12)), SamplingParams(max_tokens=4, ignore_eos=True)))  # 10 prompt, 4 new
    sched.submit(Request(list(range(2, 7)), SamplingParams(max_tokens=8)))  # 5 prompt, 8 new (7 is no eos)
    _run(sched)
    sched.submit(Request(list(range(2, 5)), SamplingParams(max_tokens=8)))  # 3 prompt, eos at once
    _run(sched, token=1)
    assert _value(registry, "request_success_total", finished_reason="length") == 2
    assert _value(registry, "request_success_total", finished_reason="stop") == 1
    assert _value(registry, "prompt_tokens_total") == 10 + 5 + 3
    assert _value(registry, "generation_tokens_total") == 4 + 8 + 1
    assert _value(registry, "e2e_request_latency_seconds_count") == 3
    assert 0 < _value(registry, "e2e_request_latency_seconds_sum") < 60


def test_cancelled_and_failed_requests_are_abort_and_error(metered):
    sched, registry = metered
    cancelled, failed = (Request(list(range(2, 8)), SamplingParams(max_tokens=50, ignore_eos=True)) for _ in range(2))
    sched.submit(cancelled)
    sched.commit(plan := sched.plan(), [ChunkResult(token=7) for _ in plan.chunks])
    sched.cancel(cancelled)
    sched.submit(failed)
    sched.fail(sched.plan(), PoolUnavailableError("pool-0", "gone"))
    assert _value(registry, "request_success_total", finished_reason="abort") == 1
    assert _value(registry, "request_success_total", finished_reason="error") == 1
    assert _value(registry, "generation_tokens_total") == 1  # the token the cancelled one had


def test_request_metrics_carry_vllms_names_and_model_label():
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics.set_model_name("tiny")
    metrics.running.set(3)
    metrics.kv_cache_usage.set(0.25)
    metrics.ttft.observe(1.5)
    metrics.itl.observe(0.02)
    assert registry.get_sample_value("num_requests_running", {"model_name": "tiny"}) == 3
    assert registry.get_sample_value("kv_cache_usage_perc", {"model_name": "tiny"}) == 0.25  # a fraction, as vLLM's
    names = {m.name for m in registry.collect()}
    for name in VLLM_NAMES:  # prometheus_client names a counter's family without _total
        assert name.removesuffix("_total") in names, name
    assert not [n for n in names if n.startswith("vllm") or n.startswith("moe_gateway_")]
    labels = {s.labels.get("model_name") for m in registry.collect() for s in m.samples}
    assert "" not in labels  # the series of the name before set_model_name are gone
    ttft = registry.get_sample_value("time_to_first_token_seconds_bucket", {"model_name": "tiny", "le": "+Inf"})
    assert ttft == 1
    buckets = [m for m in registry.collect() if m.name == "e2e_request_latency_seconds"][0].samples
    assert max(float(s.labels["le"]) for s in buckets if s.name.endswith("_bucket") and s.labels["le"] != "+Inf") >= 600


def _exported_names() -> set[str]:
    registry, auto = CollectorRegistry(), CollectorRegistry()  # moe_placement_version is in both: two registries
    GatewayMetrics(registry)
    PoolMetrics(registry)
    AutoscalerMetrics(auto)
    from services.rpc.draining import CALLS_IN_FLIGHT

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    families = [f for r in (registry, auto) for f in r.collect()] + CALLS_IN_FLIGHT.describe()
    return {f.name + suffix for f in families for suffix in suffixes[f.type]}  # labelled ones have no samples yet


def _queried(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    promql = {
        "sum",
        "rate",
        "irate",
        "increase",
        "histogram_quantile",
        "by",
        "without",
        "max",
        "min",
        "avg",
        "le",
        "count",
        "pool",
        "model_name",
        "finished_reason",
        "reason",
        "clamp_min",
        "or",
        "vector",
        "on",
        "ignoring",
        "job",
        "pod",
        "namespace",
        "service",
        "instance",
    }
    return {w for w in words if w not in promql and not w.startswith("$")}


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    exported = _exported_names()
    queried = set().union(*(_queried(e) for e in exprs))
    assert queried and queried <= exported, sorted(queried - exported)
    for name in (
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "moe_placement_balancedness",
        "moe_placement_version",
        "moe_routed_tokens_total",
        "moe_expert_rpc_duration_seconds_bucket",
        "request_success_total",
    ):
        assert name in queried, f"the dashboard shows no {name}"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for word in (
        "request rate",
        "ttft",
        "itl",
        "running",
        "kv cache",
        "balancedness",
        "placement version",
        "routed tokens",
        "expert rpc",
    ):
        assert word in titles, word


def test_requests_that_leave_while_waiting_are_counted(metered):
    """Cancelled before admission (abort), or failed when serving stops (error): never run, still counted."""
    sched, registry = metered
    sched.max_running = 1
    running, gives_up, stranded = (Request(list(range(2, 8)), SamplingParams(max_tokens=50)) for _ in range(3))
    for r in (running, gives_up, stranded):
        sched.submit(r)
    sched.commit(plan := sched.plan(), [ChunkResult(token=7) for _ in plan.chunks])
    assert [c.request for c in plan.chunks] == [running] and len(sched.waiting) == 2
    sched.cancel(gives_up)
    sched.commit(plan := sched.plan(), [ChunkResult(token=7) for _ in plan.chunks])
    assert _value(registry, "request_success_total", finished_reason="abort") == 1
    sched.close(PoolUnavailableError("gateway", "the serving loop died"))
    assert _value(registry, "request_success_total", finished_reason="error") == 2  # running and stranded
    assert _value(registry, "e2e_request_latency_seconds_count") == 3
