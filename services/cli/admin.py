"""What every admin command shares: finding the deployment's Redis."""

from __future__ import annotations

import json
import os

from services.cli.output import fail
from services.cli.up import state_dir

REDIS_ENV = "EXPERTMESH_REDIS_URL"


def resolve_redis(option: str | None) -> str:
    """--redis, else $EXPERTMESH_REDIS_URL, else the deployment that `expertmesh up` last started here."""
    if option:
        return option
    if os.environ.get(REDIS_ENV):
        return os.environ[REDIS_ENV]
    state = state_dir() / "up.json"
    if state.exists():
        try:
            return json.loads(state.read_text())["redis"]
        except (json.JSONDecodeError, KeyError):
            fail(f"{state} is malformed: pass --redis URL")
    fail(f"no Redis: pass --redis URL, set {REDIS_ENV}, or start a deployment with `expertmesh up`")
    raise AssertionError  # fail() exits
