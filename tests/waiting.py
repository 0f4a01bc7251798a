"""Waiting in tests on evidence instead of fixed sleeps: a sleep assumes how fast this machine is, a poll does not."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Call `predicate` until it returns something truthy and return that; after `timeout_s` seconds, fail with an
    AssertionError that names `what` (what was being waited for)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def wait_until_stable(read: Callable[[], T], quiet_s: float, timeout_s: float, what: str) -> T:
    """Wait until `read()` has returned the same value for `quiet_s` seconds, and return that value (for counts
    that another process flushes periodically: `quiet_s` is a few of its flush intervals)."""
    last = [read(), time.monotonic()]

    def quiet() -> bool:
        value = read()
        if value != last[0]:
            last[:] = [value, time.monotonic()]
            return False
        return time.monotonic() - last[1] >= quiet_s

    wait_until(quiet, timeout_s, what)
    return last[0]
