"""Client authentication: API keys on gRPC metadata (`authorization: Bearer KEY`).

Calls to the protected services without a valid key are answered UNAUTHENTICATED; health and reflection stay
open (probes and tools need them). Keys come from a flag or the environment, as a comma-separated list, so
that a key can be rotated by serving the old and the new one for a while.
"""

from __future__ import annotations

import hmac
import os

import grpc

API_KEY_ENV = "EXPERTMESH_API_KEY"


def parse_keys(option: str | None) -> frozenset[str]:
    """`--api-key` (comma-separated), else $EXPERTMESH_API_KEY; empty: no authentication."""
    raw = option if option else os.environ.get(API_KEY_ENV, "")
    return frozenset(k.strip() for k in raw.split(",") if k.strip())


def bearer_metadata(key: str | None) -> list[tuple[str, str]]:
    """The metadata a client sends with every call."""
    return [("authorization", f"Bearer {key}")] if key else []


def key_is_valid(header: str | None, keys: frozenset[str]) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    given = header[len("Bearer ") :].encode()
    return any(hmac.compare_digest(given, k.encode()) for k in keys)  # every key compared: no early exit


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: frozenset[str], service_names: list[str]):
        self.keys = keys
        self._services = set(service_names)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.split("/")[1]  # "/package.Service/Method"
        if handler is None or service not in self._services:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if key_is_valid(metadata.get("authorization"), self.keys):
            return handler
        return _refusing(handler)


def _refusing(handler):
    message = "a valid API key is required: send the metadata `authorization: Bearer KEY`"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as the handler it replaces

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=unary)
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=stream)
    return handler
