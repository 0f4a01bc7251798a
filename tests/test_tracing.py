"""OpenTelemetry: one request's spans on the gateway and the pool join one trace (context in gRPC metadata, and
in each message of a gateway's long-lived ForwardStream to a pool).

The gateway and an expert pool run as real gRPC servers on 127.0.0.1 in this process (the in-memory exporter
can only see spans of its own process); the calls between them go over the network stack as in production.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.cli.gateway_client import GatewayClient
from services.expert.server import start_pool
from services.format.config import ModelConfig
from services.gateway.config import GatewayConfig
from services.gateway.runtime import GatewayRuntime
from services.rpc.telemetry import setup_tracing
from services.state.placement import Placement, Pool

POOL_CALL = "ExpertPoolService/ForwardStream message"  # one client and one server span per streamed request


@pytest.fixture(scope="module")
def traced_deployment(tiny_fp8):
    exporter = InMemorySpanExporter()
    assert setup_tracing("expertmesh-test", span_processor=SimpleSpanProcessor(exporter))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    run = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(120)  # noqa: E731
    cfg = ModelConfig.from_file(tiny_fp8)
    placement_pools = []
    managed_pools = []
    for i in range(2):
        experts = Placement.spread(cfg, [Pool("pool-0", "x"), Pool("pool-1", "y")]).experts_on(f"pool-{i}")
        managed, _ = run(start_pool(tiny_fp8, f"pool-{i}", experts))
        managed_pools.append(managed)
        placement_pools.append(Pool(f"pool-{i}", managed.address))
    runtime = run(
        GatewayRuntime.start(
            GatewayConfig(model=tiny_fp8, grpc_port=0, http_port=-1), Placement.spread(cfg, placement_pools)
        )
    )
    yield runtime.managed.address, exporter
    runtime.close()
    for m in [runtime.managed, *managed_pools]:
        run(m.server.stop(0))
    loop.call_soon_threadsafe(loop.stop)


def test_one_trace_across_gateway_and_pools(traced_deployment):
    address, exporter = traced_deployment
    exporter.clear()
    client = GatewayClient(address)
    out = client.generate(None, [5, 17, 300, 42], 2, ignore_eos=True)
    client.close()
    assert len(out["token_ids"]) == 2
    spans = exporter.get_finished_spans()
    request = next(s for s in spans if s.name == "gateway.request")
    trace_spans = [s for s in spans if s.context.trace_id == request.context.trace_id]
    names = {s.name for s in trace_spans}
    assert {"gateway.request", "gateway.step", "moe.dispatch", "expert.compute"} <= names
    by_id = {s.context.span_id: s for s in trace_spans}
    # the client's Generate call is the root; the gateway's server span sits under it
    client_root = next(s for s in trace_spans if s.parent is None)
    assert client_root.kind == SpanKind.CLIENT and client_root.name.endswith("GatewayService/Generate")
    # expert.compute (pool side) <- pool server span <- gateway's client call <- moe.dispatch <- gateway.step
    compute = next(s for s in trace_spans if s.name == "expert.compute")
    pool_server = by_id[compute.parent.span_id]
    assert pool_server.kind == SpanKind.SERVER and pool_server.name.endswith(POOL_CALL)
    pool_client = by_id[pool_server.parent.span_id]
    assert pool_client.kind == SpanKind.CLIENT
    dispatch = by_id[pool_client.parent.span_id]
    assert dispatch.name == "moe.dispatch" and dispatch.attributes["expertmesh.layer"] >= 1
    step = by_id[dispatch.parent.span_id]
    assert step.name == "gateway.step" and by_id[step.parent.span_id].name == "gateway.request"
    # both pools were called for some layer, within the same trace
    pool_calls = [s for s in trace_spans if s.kind == SpanKind.SERVER and s.name.endswith(POOL_CALL)]
    assert len(pool_calls) >= 2
    # the long-lived stream itself makes no span (it would last as long as the gateway)
    assert not [s for s in spans if s.name.endswith("ExpertPoolService/ForwardStream")]
