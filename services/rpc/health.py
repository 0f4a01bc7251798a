"""Asking a server for its grpc.health.v1 status: one check, or waiting until it serves."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.rpc import tls


def is_serving(address: str, timeout_s: float = 1.0) -> bool:
    """Whether the server at host:port answers SERVING for the whole server."""
    with tls.channel(address) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status
            )
        except grpc.RpcError:
            return False
    return status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(
    address: str, timeout_s: float, name: str, gone: Callable[[], str | None] | None = None, interval_s: float = 0.1
) -> None:
    """Block until `address` serves. TimeoutError after `timeout_s`; RuntimeError as soon as `gone()` returns a
    reason (the process behind it died, say)."""
    deadline = time.monotonic() + timeout_s
    while not is_serving(address):
        reason = gone() if gone else None
        if reason:
            raise RuntimeError(f"{name}: {reason}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} at {address} is not SERVING after {timeout_s:.0f}s")
        time.sleep(interval_s)
