"""Checkpoint conversion: an FP8 checkpoint dequantized into a dense one (as DeepSeek's fp8_cast_bf16 does, but
with the correct partial 128-blocks). Used to give the Hugging Face reference implementation exact weights."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

import kernels
from services.format.checkpoint import CheckpointReader
from services.format.model_writer import write_checkpoint

SCALE_SUFFIX = "_scale_inv"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def dequantized_tensors(reader: CheckpointReader, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name in reader.names():
        if name.endswith(SCALE_SUFFIX):
            continue
        tensor = reader.get(name)
        if tensor.dtype == torch.float8_e4m3fn:
            tensor = kernels.weight_dequant(tensor, reader.get(name + SCALE_SUFFIX, dtypes=(torch.float32,)), dtype)
        yield name, tensor.to(dtype)


def dequantize_checkpoint(
    src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float32, spelling: str = "transformers"
) -> Path:
    """Write a dense copy of `src` (every tensor in `dtype`, no quantization_config) to `dst`."""
    dst = Path(dst)
    with CheckpointReader(src) as reader:
        cfg = replace(reader.config, quantization=None, dtype=str(dtype).removeprefix("torch."))
        dst.mkdir(parents=True, exist_ok=True)
        cfg.write(dst, spelling)
        write_checkpoint(dst, dequantized_tensors(reader, dtype))
    for name in SIDE_FILES:
        if (Path(src) / name).exists():
            shutil.copy(Path(src) / name, dst / name)
    return dst
