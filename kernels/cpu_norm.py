"""RMSNorm over fp32 rows on the CPU as one C pass (kernels/cpu/rms_norm.c), built on first use: torch's CPU
rms_norm runs as several ops, ~25 us a call at decode sizes (a decode step makes 33 calls on `small`). None where
it does not run (the caller then uses torch)."""

from __future__ import annotations

import torch

from kernels.cpu_build import library


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x [..., n] fp32, weight [n] fp32 -> x / sqrt(mean(x^2) + eps) * weight, or None (not a case it takes)."""
    lib = library()
    if (
        lib is None
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.dim() != 2
        or x.stride(1) != 1
        or not weight.is_contiguous()
        or weight.shape != (x.shape[1],)
    ):
        return None
    rows, n = x.shape
    out = torch.empty(rows, n)
    stride = x.stride(0) if rows > 1 else n
    if lib.em_rms_norm(x.data_ptr(), rows, n, stride, weight.data_ptr(), eps, out.data_ptr()) != 0:
        return None
    return out
