"""The one place where errors become gRPC status codes, for every server of the project."""

from __future__ import annotations

import functools
import logging

import grpc

from services.errors import (
    CacheFullError,
    CheckpointError,
    ConfigError,
    ExpertNotHeldError,
    InvalidRequestError,
    PoolUnavailableError,
    QueueFullError,
    ServerStoppingError,
)

log = logging.getLogger(__name__)

STATUS_OF: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ExpertNotHeldError, grpc.StatusCode.FAILED_PRECONDITION),
    (PoolUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (CacheFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ServerStoppingError, grpc.StatusCode.UNAVAILABLE),
    (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_of(exc: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _message(exc: BaseException) -> str:
    return (
        str(exc) if status_of(exc) is not grpc.StatusCode.INTERNAL else f"internal error: {type(exc).__name__}: {exc}"
    )


def code_and_message(exc: BaseException, where: str = "a streamed request") -> tuple[grpc.StatusCode, str]:
    """The status and message a failure is answered with (by an abort, or in band on a stream that outlives one
    bad request); an unexpected failure (INTERNAL) is logged with its traceback."""
    code = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", where)
    return code, _message(exc)


def unary(handler):
    """Wrap an aio unary handler: project errors abort with their status and message; the server keeps serving."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never a crash
            await context.abort(*code_and_message(exc, handler.__name__))

    return wrapper


def stream(handler):
    """The same for server-streaming aio handlers (async generators)."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            async for item in handler(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await context.abort(*code_and_message(exc, handler.__name__))

    return wrapper
