"""Where `expertmesh up` keeps its state on this machine: models it made, run logs, and up.json (the running
deployment's endpoints, removed when it stops)."""

from __future__ import annotations

import os
from pathlib import Path

UP_STATE = "up.json"


def state_dir() -> Path:
    """$EXPERTMESH_HOME, else $XDG_CACHE_HOME/expertmesh, else ~/.cache/expertmesh (made if missing)."""
    base = os.environ.get("EXPERTMESH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "expertmesh"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path
