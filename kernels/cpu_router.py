"""DeepSeek-V3's routing choice (group-limited top-k, normalised weights) on the CPU as one C call
(kernels/cpu/router.c), built on first use: at decode sizes the ~14 torch ops it replaces cost ~0.25 ms a MoE
layer in dispatch, the call a few microseconds. services/gateway/router.py holds the torch form, used where this
does not run (CUDA tensors, no compiler, sizes the kernel does not take)."""

from __future__ import annotations

import torch

from kernels.cpu_build import library


def route(
    scores: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    topk_group: int,
    k: int,
    norm: bool,
    factor: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """scores [T, E] fp32 (sigmoid), bias [E] fp32 -> (idx [T, K] int64, weights [T, K] fp32), or None where the
    kernel does not run (the caller then uses torch)."""
    lib = library()
    if lib is None or scores.device.type != "cpu" or scores.dtype != torch.float32 or scores.dim() != 2:
        return None
    t, e = scores.shape
    scores, bias = scores.contiguous(), bias.to(torch.float32).contiguous()
    if bias.shape != (e,):
        raise ValueError(f"a correction bias of {tuple(bias.shape)} for {e} experts")
    idx = torch.empty(t, k, dtype=torch.int64)
    weights = torch.empty(t, k)
    rc = lib.em_route(
        scores.data_ptr(), bias.data_ptr(), t, e, groups, topk_group, k, int(norm), factor, idx.data_ptr(),
        weights.data_ptr(),
    )  # fmt: skip
    return (idx, weights) if rc == 0 else None
