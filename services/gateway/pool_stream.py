"""A gateway's long-lived ForwardStream to one expert pool.

A unary call per pool per MoE layer pays gRPC's per-call work on both sides (a new HTTP/2 stream, the server's
interceptors and call set-up, metadata); on one stream a request is one message out and one message back. The
pool answers in order, so the answers match the requests first in, first out (and each carries its request's
id, checked). `send` returns a Future per request: its result is the ForwardResponse, or it raises
`PoolCallError` with the status the pool gave that request in band, or the status that ended the stream (then
every request waiting on it fails alike, and the next `send` opens a new stream). An answered Future's
`arrived_at` is when its answer came off the stream (time.monotonic(), on the reader thread).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future

import grpc

from expertmesh.v1 import expert_pool_pb2

SERVICE = expert_pool_pb2.DESCRIPTOR.services_by_name["ExpertPoolService"].full_name
FORWARD_STREAM_METHOD = f"/{SERVICE}/ForwardStream"
MESSAGE_SPAN = f"{SERVICE}/ForwardStream message"  # a client span per streamed request, when tracing
STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}  # google.rpc.Code number -> status
_CLOSE = object()


class PoolCallError(grpc.RpcError):
    """A pool request's failure, read as grpc.RpcError is (code(), details())."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class PoolStream:
    def __init__(self, channel: grpc.Channel):
        self._open = channel.stream_stream(
            FORWARD_STREAM_METHOD,
            request_serializer=None,
            response_deserializer=expert_pool_pb2.ForwardStreamResponse.FromString,
        )
        self._lock = threading.Lock()
        self._link: _Link | None = None
        self._next_id = 1

    def send(self, message: expert_pool_pb2.ForwardStreamRequest) -> tuple[Future, int]:
        """-> (a Future of the ForwardResponse, the bytes sent)."""
        with self._lock:
            if self._link is None or self._link.broken:
                self._link = _Link(self._open)
            message.id = self._next_id
            self._next_id += 1
            data = message.SerializeToString()
            return self._link.send(message.id, data), len(data)

    def reset(self) -> None:
        """Give up on the open stream (a request on it timed out): its waiting requests fail, the next `send`
        opens a new one."""
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            link.close("the stream was reset after a request timed out")

    def close(self) -> None:
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            link.close("the gateway is closing its pool streams")


class _Link:
    """One open ForwardStream: an outbox the channel's thread reads requests from, and a reader thread that
    resolves the waiting futures in order."""

    def __init__(self, open_stream):
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: collections.deque[tuple[int, Future]] = collections.deque()
        self._lock = threading.Lock()
        self.broken = False
        self._responses = open_stream(iter(self._outbox.get, _CLOSE))
        threading.Thread(target=self._read, name="pool-stream-reader", daemon=True).start()

    def send(self, request_id: int, data: bytes) -> Future:
        future: Future = Future()
        with self._lock:
            if self.broken:
                future.set_exception(PoolCallError(grpc.StatusCode.UNAVAILABLE, "the pool stream is closed"))
                return future
            self._waiting.append((request_id, future))
        self._outbox.put(data)
        return future

    def _read(self) -> None:
        error = PoolCallError(grpc.StatusCode.UNAVAILABLE, "the pool ended the stream")
        try:
            for answer in self._responses:
                with self._lock:
                    request_id, future = self._waiting.popleft() if self._waiting else (None, None)
                if future is None or answer.id != request_id:
                    error = PoolCallError(
                        grpc.StatusCode.INTERNAL, f"answer {answer.id} came where {request_id} was awaited"
                    )
                    if future is not None:
                        future.set_exception(error)
                    break
                if answer.error_code:
                    code = STATUS_CODES.get(answer.error_code, grpc.StatusCode.UNKNOWN)
                    future.set_exception(PoolCallError(code, answer.error_message))
                else:
                    future.arrived_at = time.monotonic()
                    future.set_result(answer.response)
        except grpc.RpcError as exc:
            error = PoolCallError(exc.code(), exc.details() or "the pool stream failed")
        self._fail_waiting(error)
        self._responses.cancel()

    def _fail_waiting(self, error: PoolCallError) -> None:
        with self._lock:
            self.broken = True
            waiting, self._waiting = list(self._waiting), collections.deque()
        self._outbox.put(_CLOSE)
        for _, future in waiting:
            if not future.done():
                future.set_exception(error)

    def close(self, why: str) -> None:
        self._fail_waiting(PoolCallError(grpc.StatusCode.CANCELLED, why))
        self._responses.cancel()
