"""Drain before stop: a server interceptor that knows which calls are being answered and refuses new ones.

grpc's own graceful stop (`server.stop(grace)`) sends GOAWAY while calls are still running and closes each
connection the moment its last stream completes: a large answer in flight at the stop can lose its tail
("Connection reset by peer"; measured in BENCHMARKS.md, "Distributed serving vs in-process"). So a stopping
server drains first: new calls of its own services get UNAVAILABLE (a gateway retries them on another replica),
calls already running finish on the open connection, and the last answer gets `LINGER_SECONDS` to reach its
client before the server stops. Health and reflection calls are neither counted nor refused: a health Watch
lasts as long as its client.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
from prometheus_client import Gauge

# how long the last answer gets to reach its client before connections close: a stop that comes right after an
# answer is delayed up to this long, against the tail of that answer being cut off
LINGER_SECONDS = 0.25

# exported on the /metrics of whichever process serves (the default registry): what a stop would wait for
CALLS_IN_FLIGHT = Gauge("moe_grpc_calls_in_flight", "Calls of the server's own services being answered.", ["service"])


class DrainingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service_names: list[str]):
        self._services = set(service_names)
        self.in_flight = 0
        self.draining = False
        self._last_finished = 0.0
        self._idle = asyncio.Event()
        self._idle.set()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.split("/")[1]  # "/package.Service/Method"
        if handler is None or service not in self._services:
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, service))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, service))
        if handler.stream_stream is not None:  # long-lived: its messages count while answered (`track`)
            return handler._replace(stream_stream=self._refusing(handler.stream_stream))
        return handler

    def _unary(self, behavior, service: str):
        async def unary(request, context):
            await self._enter(context, service)
            try:
                return await behavior(request, context)
            finally:
                self._exit(service)

        return unary

    def _stream(self, behavior, service: str):
        async def stream(request, context):
            await self._enter(context, service)
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                self._exit(service)

        return stream

    def _refusing(self, behavior):
        async def stream(request_iterator, context):
            if self.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            async for item in behavior(request_iterator, context):
                yield item

        return stream

    @contextlib.contextmanager
    def track(self, service: str):
        """One message of a long-lived stream being answered: counted like a call (a stop waits for it)."""
        self.in_flight += 1
        CALLS_IN_FLIGHT.labels(service).inc()
        self._idle.clear()
        try:
            yield
        finally:
            self._exit(service)

    async def _enter(self, context, service: str) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        self.in_flight += 1
        CALLS_IN_FLIGHT.labels(service).inc()
        self._idle.clear()

    def _exit(self, service: str) -> None:
        self.in_flight -= 1
        CALLS_IN_FLIGHT.labels(service).dec()
        self._last_finished = time.monotonic()
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls; wait until running ones are answered and the last answer had time to reach its
        client, or `timeout` passed. -> whether every call was answered."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        await asyncio.sleep(max(0.0, self._last_finished + LINGER_SECONDS - time.monotonic()))
        return True
