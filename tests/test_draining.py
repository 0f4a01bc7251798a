"""A stopping server drains: running calls are answered in full on open connections, new ones get UNAVAILABLE.

A real grpc.aio server on 127.0.0.1 (the project's ManagedServer) and a real grpc.aio client; the handler waits
on an event, so the call is provably running when the stop begins.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.rpc.grpc_server import CHANNEL_OPTIONS, ManagedServer

SERVICE = "expertmesh.test.Slow"
ANSWER_BYTES = 8 << 20


def _identity(b: bytes) -> bytes:
    return b


def _exported_in_flight() -> float:
    return REGISTRY.get_sample_value("moe_grpc_calls_in_flight", {"service": SERVICE})


async def _serve():
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(request: bytes, context) -> bytes:
        started.set()
        await release.wait()
        return b"x" * ANSWER_BYTES

    managed = ManagedServer([SERVICE])
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Call": grpc.unary_unary_rpc_method_handler(
                slow, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    managed.server.add_generic_rpc_handlers((handler,))
    await managed.start()
    await managed.set_serving()
    return managed, started, release


@pytest.mark.asyncio
async def test_stop_answers_running_calls_and_refuses_new_ones():
    managed, started, release = await _serve()
    async with grpc.aio.insecure_channel(managed.address, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Call", request_serializer=_identity, response_deserializer=_identity)
        running = asyncio.ensure_future(call(b"", timeout=30))
        await asyncio.wait_for(started.wait(), 10)
        assert managed.draining.in_flight == 1 and _exported_in_flight() == 1

        managed.request_stop()
        stopping = asyncio.ensure_future(managed.wait_for_stop())
        while not managed.draining.draining:
            await asyncio.sleep(0.01)

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.value.details()
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING  # health still answers while draining
        assert not stopping.done()  # the running call holds the stop

        release.set()
        assert len(await running) == ANSWER_BYTES
        await asyncio.wait_for(stopping, 10)
        assert managed.draining.in_flight == 0 and _exported_in_flight() == 0


@pytest.mark.asyncio
async def test_stop_without_calls_is_immediate():
    managed, _, _ = await _serve()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    managed.request_stop()
    await asyncio.wait_for(managed.wait_for_stop(), 10)
    assert loop.time() - t0 < 1.0
