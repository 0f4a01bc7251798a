"""The one place where errors become HTTP statuses and OpenAI error bodies (the HTTP twin of
services/rpc/grpc_status.py): `{"error": {"message", "type", "param", "code"}}`.

Bad input is a 400 (never a 500), a missing or wrong API key a 401, an unknown route a 404, a full queue a 429,
a server that is loading, stopping or has lost its serving loop a 503. Anything else is a 500, logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.errors import (
    CacheFullError,
    CheckpointError,
    ConfigError,
    ExpertmeshError,
    ExpertNotHeldError,
    InvalidRequestError,
    PoolUnavailableError,
    QueueFullError,
    ServerStoppingError,
)

log = logging.getLogger(__name__)


class ParamError(InvalidRequestError):
    """A bad request parameter, named (OpenAI's `param`), with an optional machine-readable `code`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param)
        self.code = code


class AuthenticationError(ExpertmeshError):
    """No valid API key on a call that needs one."""


class RouteNotFoundError(ExpertmeshError):
    """No such route (or not with this method)."""


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str  # OpenAI's error type
    code: str | None = None


STATUS_OF: list[tuple[type[BaseException], HttpError]] = [
    (InvalidRequestError, HttpError(400, "invalid_request_error")),
    (AuthenticationError, HttpError(401, "authentication_error", "invalid_api_key")),
    (RouteNotFoundError, HttpError(404, "not_found_error")),
    (QueueFullError, HttpError(429, "rate_limit_error", "queue_full")),
    (CacheFullError, HttpError(429, "rate_limit_error", "cache_full")),
    (ServerStoppingError, HttpError(503, "service_unavailable_error", "server_stopping")),
    (PoolUnavailableError, HttpError(503, "service_unavailable_error")),
    (ExpertNotHeldError, HttpError(503, "service_unavailable_error")),
    (CheckpointError, HttpError(500, "server_error")),
    (ConfigError, HttpError(500, "server_error")),
]
INTERNAL = HttpError(500, "server_error", "internal_error")


def http_error_of(exc: BaseException) -> HttpError:
    for cls, error in STATUS_OF:
        if isinstance(exc, cls):
            return error
    return INTERNAL


def error_body(exc: BaseException) -> tuple[int, dict]:
    """(status, OpenAI error body) for an exception; unexpected ones are logged with their traceback."""
    error = http_error_of(exc)
    if error is INTERNAL:
        log.error("request failed", exc_info=exc)
        message = f"internal error: {type(exc).__name__}: {exc}"
    else:
        message = str(exc)
    param = getattr(exc, "param", None)
    code = getattr(exc, "code", None) or error.code
    return error.status, {"error": {"message": message, "type": error.type, "param": param, "code": code}}
