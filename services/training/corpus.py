"""The training corpus: the Python standard library's own source (present wherever Python is: no download),
as token ids of the model's own tokenizer. Training reads `TRAIN_MODULES`; scoring uses `HELD_OUT_MODULES`,
which training never sees."""

from __future__ import annotations

import importlib
from pathlib import Path

from services.format.tokenizer import load_tokenizer

TRAIN_MODULES = ("argparse", "textwrap", "dataclasses", "functools", "inspect", "typing", "enum", "pathlib")
HELD_OUT_MODULES = ("json.decoder", "csv", "shlex", "string", "heapq", "bisect", "fnmatch", "glob")


def module_source(name: str) -> str:
    return Path(importlib.import_module(name).__file__).read_text()


def corpus_ids(model_dir: Path, modules: tuple[str, ...]) -> list[list[int]]:
    """Each module's source as token ids of the model's own tokenizer."""
    tok = load_tokenizer(model_dir)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
    return [tok.encode(module_source(m), add_special_tokens=False).ids for m in modules]


def held_out_windows(model_dir: Path, length: int = 64, per_module: int = 4) -> list[list[int]]:
    """Consecutive `length`-token windows from the start of each held-out module."""
    windows = []
    for ids in corpus_ids(model_dir, HELD_OUT_MODULES):
        windows += [ids[i : i + length] for i in range(0, min(len(ids) - length, per_module * length), length)]
    return windows
