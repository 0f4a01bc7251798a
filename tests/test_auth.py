"""API keys on the gateway: a real grpc.aio server; calls without a valid `authorization: Bearer KEY` are
UNAUTHENTICATED, health stays open, and a valid key gets through to the service."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertmesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.grpc_servicer import SERVICE_NAME, GatewayServicer
from services.rpc.auth import bearer_metadata, key_is_valid, parse_keys
from services.rpc.grpc_server import ManagedServer


def test_keys_from_flag_or_environment(monkeypatch):
    monkeypatch.setenv("EXPERTMESH_API_KEY", "env-key")
    assert parse_keys("a, b,") == {"a", "b"} and parse_keys(None) == {"env-key"}
    monkeypatch.delenv("EXPERTMESH_API_KEY")
    assert parse_keys(None) == frozenset()
    assert key_is_valid("Bearer b", frozenset({"a", "b"}))
    assert not key_is_valid("Bearer c", frozenset({"a", "b"})) and not key_is_valid("b", frozenset({"b"}))


def test_gateway_refuses_calls_without_a_valid_key():
    async def scenario():
        managed = ManagedServer([SERVICE_NAME], "127.0.0.1", 0, api_keys=frozenset({"s3cret", "next"}))
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
            GatewayServicer(gateway_pb2.GetModelInfoResponse()), managed.server
        )
        await managed.start()
        try:
            async with grpc.aio.insecure_channel(managed.address) as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)
                codes = {}
                for name, metadata in [
                    ("none", []),
                    ("wrong", bearer_metadata("nope")),
                    ("good", bearer_metadata("s3cret")),
                    ("rotated", bearer_metadata("next")),
                ]:
                    try:
                        await stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), metadata=metadata, timeout=5)
                    except grpc.aio.AioRpcError as err:
                        codes[name] = (err.code(), err.details())
                    try:
                        async for _ in stub.Generate(
                            gateway_pb2.GenerateRequest(token_ids=[1]), metadata=metadata, timeout=5
                        ):
                            pass
                    except grpc.aio.AioRpcError as err:
                        codes[name + "-stream"] = err.code()
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return codes, health.status
        finally:
            await managed.server.stop(0)

    codes, health = asyncio.run(scenario())
    assert codes["none"][0] == codes["wrong"][0] == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in codes["none"][1]
    assert codes["none-stream"] == codes["wrong-stream"] == grpc.StatusCode.UNAUTHENTICATED
    # with a key the call reaches the servicer, which is still loading its model (no core attached)
    assert codes["good"][0] == codes["rotated"][0] == grpc.StatusCode.UNAVAILABLE
    assert codes["good-stream"] == grpc.StatusCode.UNAVAILABLE
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING  # answered: health needs no key


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic s3cret", "Bearer s3cret2"])
def test_malformed_headers_are_refused(header):
    assert not key_is_valid(header, frozenset({"s3cret"}))
