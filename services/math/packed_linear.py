"""A linear layer's weight, pre-packed once for the CPU's oneDNN GEMM when that pays.

On CPU, torch runs float32 `mm` through MKL, which re-packs the weight on every call: for decode-sized inputs
(1-64 rows) that pass over the weight costs more than the products. oneDNN's linear with a weight reordered
once at load skips it: on this project's CI machine (2 cores, AVX-512) a [16384, 512] float32 weight times 8
rows takes 1.7 ms instead of 8.2 ms, times 32 rows 3.3 ms instead of 6.6 ms, with float32 accumulation
(errors against float64 within 3x of MKL's, both at float32 rounding). Small weights gain nothing (the call
overhead is ~18 us), so only weights of at least `PACK_MIN_ELEMENTS` are packed. On CUDA, or where torch
lacks oneDNN, a `Linear` is the plain weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_MIN_ELEMENTS = 1 << 18  # [512, 512] and up; measured break-even (benchmarks/BENCHMARKS.md)
PACK_DTYPES = (torch.float32, torch.bfloat16)


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class Linear:
    """y = x @ weight^T, weight [out, in]; `packed` holds oneDNN's reordered copy when used."""

    __slots__ = ("weight", "packed", "shape", "dtype")

    def __init__(self, weight: torch.Tensor, pack: bool | None = None, keep_plain: bool = True):
        """`keep_plain=False` drops the plain weight once packed (inputs must then come in the weight's dtype)."""
        if pack is None:
            pack = (weight.device.type == "cpu" and weight.dtype in PACK_DTYPES
                    and weight.numel() >= PACK_MIN_ELEMENTS and packing_available())
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 32) if pack else None
        self.weight = weight if keep_plain or self.packed is None else None  # [out, in]
        self.shape, self.dtype = weight.shape, weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if self.packed is not None and x.dtype == self.dtype and x.device.type == "cpu":
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")
        if self.weight is None:
            raise TypeError(f"packed {self.dtype} linear {list(self.shape)} called with a {x.dtype} {x.device.type} input")
        return plain_linear(x, self.weight)


def plain_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T -> [T, out] through torch's default GEMM.

    For decode-sized batches (16..128 rows) on CPU, W @ x^T streams the weight faster than x @ W^T: the small-
    batch decode step of the `small` preset ran 13% faster over three alternating runs (385 -> 430 tok/s at
    batch 32, fp32); the lm_head alone went from 9.8 to 5.7 ms. Same products, fp32 rounding apart.
    """
    if x.dim() == 2 and 16 <= x.shape[0] <= 128 and not x.is_cuda:
        return torch.mm(weight, x.t()).t()
    return F.linear(x, weight)
