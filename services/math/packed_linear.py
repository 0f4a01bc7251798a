"""A linear layer's weight, pre-packed once for the CPU's oneDNN GEMM when that pays.

On CPU, torch runs float32 `mm` through MKL, which re-packs the weight on every call: for decode-sized inputs
(1-64 rows) that pass over the weight costs more than the products. oneDNN's linear with a weight reordered
once at load skips it, with float32 accumulation (errors against float64 at float32 rounding, like MKL's). A
small weight gains less than the call's fixed overhead, so only weights of at least `PACK_MIN_ELEMENTS` are
packed (figures: BENCHMARKS.md, "Engine vs transformers", oneDNN-packed weights). On CUDA, or where torch lacks
oneDNN, a `Linear` is the plain weight.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

PACK_MIN_ELEMENTS = 1 << 18  # [512, 512] and up: below it the per-call overhead eats the gain (BENCHMARKS.md)
PACK_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN packs `dtype` weights here: torch built with it and, for bfloat16, a CPU with the
    instructions oneDNN needs for it (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only CPU has none). Probed once
    per dtype with a small weight."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(32, 32, dtype=dtype), 32)
    except RuntimeError:
        return False
    return True


class Linear:
    """y = x @ weight^T, weight [out, in]; `packed` holds oneDNN's reordered copy when used."""

    __slots__ = ("weight", "packed", "shape", "dtype")

    def __init__(self, weight: torch.Tensor, pack: bool | None = None, keep_plain: bool = True):
        """`keep_plain=False` drops the plain weight once packed (inputs must then come in the weight's dtype)."""
        if pack is None:
            pack = (
                weight.device.type == "cpu"
                and weight.dtype in PACK_DTYPES
                and weight.numel() >= PACK_MIN_ELEMENTS
                and packing_available(weight.dtype)
            )
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 32) if pack else None
        self.weight = weight if keep_plain or self.packed is None else None  # [out, in]
        self.shape, self.dtype = weight.shape, weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if self.packed is not None and x.dtype == self.dtype and x.device.type == "cpu":
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")
        if self.weight is None:
            raise TypeError(
                f"packed {self.dtype} linear {list(self.shape)} called with a {x.dtype} {x.device.type} input"
            )
        return plain_linear(x, self.weight)


def plain_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T -> [T, out] through torch's default GEMM.

    For decode-sized batches (16..128 rows) on CPU, W @ x^T streams the weight faster than x @ W^T (measured:
    BENCHMARKS.md, "Engine vs transformers"). Same products, fp32 rounding apart.
    """
    if x.dim() == 2 and 16 <= x.shape[0] <= 128 and not x.is_cuda:
        return torch.mm(weight, x.t()).t()
    return F.linear(x, weight)
