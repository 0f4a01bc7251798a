"""`generation_config.json`: the sampling defaults a checkpoint ships (DeepSeek-V3: temperature 0.6, top_p 0.95).

Only the settings a request can also give are read (temperature, top_p, top_k), as vLLM reads them; a missing
file or key leaves that default unset. `do_sample` is not read: a request that wants greedy decoding asks for
temperature 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from services.errors import ExpertmeshError

GENERATION_CONFIG = "generation_config.json"


class GenerationConfigError(ExpertmeshError):
    """generation_config.json exists but cannot be used: names the file and the key."""


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


def _number(data: dict, key: str, path: Path, kind: type) -> float | int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GenerationConfigError(f"{path}: {key} must be a finite number, got {value!r}")
    if kind is int and value != int(value):
        raise GenerationConfigError(f"{path}: {key} must be an integer, got {value!r}")
    return kind(value)


def read_generation_defaults(directory: str | Path) -> GenerationDefaults:
    path = Path(directory) / GENERATION_CONFIG
    if not path.exists():
        return GenerationDefaults()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenerationConfigError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise GenerationConfigError(f"{path}: expected a JSON object")
    defaults = GenerationDefaults(
        temperature=_number(data, "temperature", path, float),
        top_p=_number(data, "top_p", path, float),
        top_k=_number(data, "top_k", path, int),
    )
    if defaults.temperature is not None and defaults.temperature < 0:
        raise GenerationConfigError(f"{path}: temperature must be >= 0, got {defaults.temperature}")
    if defaults.top_p is not None and not 0 < defaults.top_p <= 1:
        raise GenerationConfigError(f"{path}: top_p must lie in (0, 1], got {defaults.top_p}")
    if defaults.top_k is not None and defaults.top_k < 0:
        raise GenerationConfigError(f"{path}: top_k must be >= 0, got {defaults.top_k}")
    return defaults
