"""Greedy sampling's argmax over rows of logits on the CPU as one C pass (kernels/cpu/argmax.c), built on first
use; torch.argmax where it does not run. The same answer as torch.argmax: the first index of the largest value,
or of a row's first NaN."""

from __future__ import annotations

import torch

from kernels.cpu_build import library


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] -> [N] int64."""
    lib = library()
    if lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] == 0:
        return x.argmax(-1)
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    stride = x.stride(0) if x.shape[0] > 1 else x.shape[1]
    if lib.em_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], stride, out.data_ptr()) != 0:
        return x.argmax(-1)
    return out
