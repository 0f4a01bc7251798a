"""OpenTelemetry set-up shared by every service.

Off by default. Exporting turns on when the standard variables ask for it: OTEL_TRACES_EXPORTER=otlp, or
OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set (OTLP over gRPC; OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES as usual). gRPC calls are instrumented so that context travels in metadata and a
request's spans on the gateway and the pools join one trace.
"""

from __future__ import annotations

import contextlib
import os

from opentelemetry import trace

TRACER_NAME = "expertmesh"
_instrumented = False
_active = False


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def active() -> bool:
    """Whether this process set up tracing. The per-layer hot paths (a gateway's dispatch, a pool's message)
    make no spans at all when it did not: a non-recording span still costs tens of microseconds to make."""
    return _active


def hot_span(name: str, **kwargs):
    """`tracer().start_as_current_span` where tracing is active, else a context that yields None."""
    return tracer().start_as_current_span(name, **kwargs) if _active else contextlib.nullcontext()


def exporting_requested() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").lower() == "otlp":
        return True
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(service_name: str, span_processor=None) -> bool:
    """Install a tracer provider (OTLP from the environment, or the given processor, e.g. an in-memory one in
    tests) and instrument gRPC. Returns whether tracing is on."""
    if span_processor is None and not exporting_requested():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    if span_processor is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        span_processor = BatchSpanProcessor(OTLPSpanExporter())
    provider = TracerProvider(
        resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    )
    provider.add_span_processor(span_processor)
    trace.set_tracer_provider(provider)
    instrument_grpc()
    global _active
    _active = True
    return True


def instrument_grpc() -> None:
    """Patch gRPC (aio servers, aio and sync clients) once per process; health probes make no spans, and nor
    does a pool's long-lived ForwardStream as a whole: each of its messages gets a client and a server span of
    its own (the context travels in the message)."""
    global _instrumented
    if _instrumented:
        return
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
        GrpcInstrumentorClient,
        filters,
    )

    quiet = filters.all_of(filters.negate(filters.health_check()), filters.negate(filters.method_name("ForwardStream")))
    GrpcAioInstrumentorServer().instrument(filter_=quiet)
    GrpcAioInstrumentorClient().instrument(filter_=quiet)
    GrpcInstrumentorClient().instrument(filter_=quiet)
    _instrumented = True
