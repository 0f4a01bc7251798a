"""What every expertmesh gRPC server shares: message limits, health, reflection, draining stop on SIGTERM."""

from __future__ import annotations

import asyncio
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.rpc import tls
from services.rpc.auth import ApiKeyInterceptor
from services.rpc.draining import DrainingInterceptor
from services.rpc.malformed import MalformedRequestInterceptor

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # a 4096-token batch of V3 hidden states in fp32 is 117 MiB
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [("grpc.http2.min_ping_interval_without_data_ms", 10_000)]
GRACE_SECONDS = 10.0  # default drain time: running calls get this long to finish after SIGTERM


class ManagedServer:
    """A grpc.aio server bound to host:port with health (NOT_SERVING until `set_serving`) and reflection."""

    def __init__(
        self,
        service_names: list[str],
        host: str = "127.0.0.1",
        port: int = 0,
        drain_timeout_s: float = GRACE_SECONDS,
        api_keys: frozenset[str] = frozenset(),
    ):
        self.drain_timeout_s = drain_timeout_s
        self.draining = DrainingInterceptor(service_names)
        interceptors = [ApiKeyInterceptor(api_keys, service_names)] if api_keys else []
        interceptors += [self.draining, MalformedRequestInterceptor(service_names)]
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = service_names
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = tls.add_port(self.server, f"{host}:{port}")
        self.address = f"{host}:{self.port}"
        self._stop = asyncio.Event()

    async def start(self) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()

    async def set_serving(self, serving: bool = True) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    def stop_on_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

    async def wait_for_stop(self, on_drain_timeout=None) -> None:
        """Until SIGTERM/SIGINT: then report NOT_SERVING, refuse new calls, answer the running ones on open
        connections for up to `drain_timeout_s`, and stop. Calls still running then are ended:
        `on_drain_timeout()` may end them with a reason first (the gateway says the server is stopping)."""
        await self._stop.wait()
        await self.set_serving(False)
        if not await self.draining.drain(self.drain_timeout_s) and on_drain_timeout is not None:
            on_drain_timeout()
            await self.draining.drain(1.0)
        await self.server.stop(0.5)

    def request_stop(self) -> None:
        self._stop.set()
