"""Settings dataclasses as command lines and chart values: one name, one default and one help per setting.

A field `cache_tokens` is the flag `--cache-tokens` and the Helm value `cacheTokens`; a field in seconds ends in
`_s` (`load_window_s` is `--load-window-s` and `loadWindowSeconds`). Services build their argparse parser from
the dataclass (`add_flags`, `from_flags`), `expertmesh up` writes a child's command line from an instance
(`to_argv`), and the chart tests check the chart's values against the same fields (`chart_key`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any


def setting(default: Any, help: str, *, choices: tuple | None = None, flag: bool = True) -> Any:
    """A dataclass field with its flag's help. `flag=False`: set by the program that assembles, not by a flag."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def chart_key(field_name: str) -> str:
    """`load_window_s` -> `loadWindowSeconds`, `cache_tokens` -> `cacheTokens`."""
    words = field_name.split("_")
    if words[-1] == "s":
        words[-1] = "seconds"
    return words[0] + "".join(w.capitalize() for w in words[1:])


def flag_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]


def _type_of(f: dataclasses.Field, default: Any):
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return type(default)
    if "Path" in str(f.type):
        return Path
    return str


def add_flags(parser: argparse.ArgumentParser, cls, required: tuple[str, ...] = ()) -> None:
    """One flag per field of `cls`, with the field's default and help."""
    for f in flag_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = _type_of(f, default)
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(
                flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            continue
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            type=kind,
            default=default,
            help=help_text,
            choices=f.metadata.get("choices"),
            required=f.name in required,
        )


def from_flags(cls, args: argparse.Namespace, **overrides):
    values = {f.name: getattr(args, f.name) for f in flag_fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def to_argv(obj) -> list[str]:
    """The command line that gives `obj`'s flag fields back: only those that differ from the default."""
    argv: list[str] = []
    for f in flag_fields(type(obj)):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag_name(f.name) if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag_name(f.name), str(value)]
    return argv


def defaults(cls) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
