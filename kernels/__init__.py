"""FP8 kernels. Call these: they run the Triton kernels on CUDA tensors and the torch references elsewhere.

Dense: `act_quant`, `weight_dequant`, `fp8_gemm` (kernels/triton_fp8.py; act_quant and `act_dequant_finite` on
the CPU: kernels/cpu_act.py). Routed experts: `grouped_fp8_gemm`,
`grouped_fp8_swiglu` and the whole expert MLP over rows sorted by expert, `grouped_fp8_mlp`
(kernels/triton_grouped.py).
"""

from __future__ import annotations

import torch

from kernels import cpu_act, reference
from kernels.cpu_act import act_dequant_bytes, act_dequant_finite
from kernels.reference import BLOCK, FP8_DTYPE, FP8_MAX, act_dequant, weight_quant

__all__ = [
    "BLOCK",
    "FP8_DTYPE",
    "FP8_MAX",
    "act_quant",
    "act_dequant",
    "act_dequant_finite",
    "act_dequant_bytes",
    "weight_dequant",
    "weight_quant",
    "fp8_gemm",
    "grouped_fp8_gemm",
    "grouped_fp8_swiglu",
    "grouped_fp8_mlp",
]


def _triton():
    from kernels import triton_fp8  # imported lazily: triton is an optional dependency on CPU machines

    return triton_fp8


def _triton_grouped():
    from kernels import triton_grouped

    return triton_grouped


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton().act_quant(x) if x.is_cuda else cpu_act.act_quant(x)


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _triton().weight_dequant(q, scale_inv, dtype) if q.is_cuda else cpu_act.weight_dequant(q, scale_inv, dtype)


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    if a.is_cuda:
        return _triton().fp8_gemm(a, a_scale, b, b_scale, out_dtype)
    return reference.fp8_gemm(a, a_scale, b, b_scale, out_dtype)


def grouped_fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    counts: list[int],
    rows: list[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows of `a` sorted into groups (counts[g] rows each) through stacked expert weights w[rows[g]]: [P, N]."""
    impl = _triton_grouped() if a.is_cuda else reference
    return impl.grouped_fp8_gemm(a, a_scale, w, w_scale, counts, rows, out_dtype)


def grouped_fp8_swiglu(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    gate: torch.Tensor,
    gate_scale: torch.Tensor,
    up: torch.Tensor,
    up_scale: torch.Tensor,
    counts: list[int],
    rows: list[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """silu(a @ gate[g]^T) * (a @ up[g]^T) per group: [P, I]."""
    impl = _triton_grouped() if a.is_cuda else reference
    return impl.grouped_fp8_swiglu(a, a_scale, gate, gate_scale, up, up_scale, counts, rows, out_dtype)


def grouped_fp8_mlp(
    x: torch.Tensor,
    gate: torch.Tensor,
    gate_scale: torch.Tensor,
    up: torch.Tensor,
    up_scale: torch.Tensor,
    down: torch.Tensor,
    down_scale: torch.Tensor,
    counts: list[int],
    rows: list[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Routed experts' SwiGLU over x [P, H], rows sorted by expert (group g: counts[g] rows through expert stack
    row rows[g]) -> [P, H], as block-scaled FP8 GEMMs (see reference.grouped_fp8_mlp)."""
    impl = _triton_grouped() if x.is_cuda else reference
    return impl.grouped_fp8_mlp(x, gate, gate_scale, up, up_scale, down, down_scale, counts, rows, out_dtype)
