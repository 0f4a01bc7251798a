"""FP8 kernels. Call these: they run the Triton kernels on CUDA tensors and the torch references elsewhere."""

from __future__ import annotations

import torch

from kernels import reference
from kernels.reference import BLOCK, FP8_DTYPE, FP8_MAX, act_dequant, weight_quant

__all__ = ["BLOCK", "FP8_DTYPE", "FP8_MAX", "act_quant", "act_dequant", "weight_dequant", "weight_quant", "fp8_gemm"]


def _triton():
    from kernels import triton_fp8  # imported lazily: triton is an optional dependency on CPU machines

    return triton_fp8


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton().act_quant(x) if x.is_cuda else reference.act_quant(x)


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _triton().weight_dequant(q, scale_inv, dtype) if q.is_cuda else reference.weight_dequant(q, scale_inv, dtype)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if a.is_cuda:
        return _triton().fp8_gemm(a, a_scale, b, b_scale, out_dtype)
    return reference.fp8_gemm(a, a_scale, b, b_scale, out_dtype)
