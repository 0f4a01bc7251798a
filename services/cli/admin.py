"""What every admin command shares: finding the deployment's Redis, and checking that it answers."""

from __future__ import annotations

import json
import os
import time
from urllib.parse import urlsplit, urlunsplit

from services.cli.local_state import UP_STATE, state_dir
from services.cli.output import fail
from services.errors import ExpertmeshError

REDIS_ENV = "EXPERTMESH_REDIS_URL"
REDIS_CHECK_TIMEOUT_S = 2.0


class RedisUnreachableError(ExpertmeshError):
    """A Redis URL that is malformed, or whose server does not answer PING. The message names the URL."""


def redacted(url: str) -> str:
    """`url` with any password replaced by '***', fit for an error message."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url


def check_redis(url: str, timeout_s: float = REDIS_CHECK_TIMEOUT_S) -> None:
    """Raise RedisUnreachableError (one line, naming the URL) unless `url` is a well-formed Redis URL whose
    server answers PING within `timeout_s`. Every command that takes --redis calls it before using the URL."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    except ValueError as exc:
        raise RedisUnreachableError(f"invalid Redis URL {redacted(url)!r}: {exc}") from None
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise RedisUnreachableError(f"Redis at {redacted(url)} is unreachable: {exc}") from None
    finally:
        client.close()


def resolve_redis(option: str | None, check: bool = True) -> str:
    """--redis, else $EXPERTMESH_REDIS_URL, else the deployment that `expertmesh up` last started here; with
    `check`, one that answers (else a one-line error, exit 2)."""
    url = _find_redis(option)
    if check:
        try:
            check_redis(url)
        except RedisUnreachableError as exc:
            fail(str(exc))
    return url


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _find_redis(option: str | None) -> str:

    if option:
        return option
    if os.environ.get(REDIS_ENV):
        return os.environ[REDIS_ENV]
    state = state_dir() / UP_STATE
    if state.exists():
        try:
            saved = json.loads(state.read_text())
            url = saved["redis"]
        except (OSError, ValueError, KeyError, TypeError):
            fail(f"{state} is malformed: pass --redis URL")
        if not isinstance(url, str) or not url:
            fail(f"{state} is malformed: pass --redis URL")
        if not _alive(saved.get("pid")):
            started = saved.get("started")
            when = f" started at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
            fail(
                f"no running deployment: the one `expertmesh up`{when} (pid {saved.get('pid')}) is gone; "
                "start one with `expertmesh up` or pass --redis URL"
            )
        return url
    fail(f"no Redis: pass --redis URL, set {REDIS_ENV}, or start a deployment with `expertmesh up`")
    raise AssertionError  # fail() exits
