"""Small building blocks shared by the gateway and the expert pools."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import cpu_norm
from services.math.packed_linear import Linear, plain_linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, round to the input dtype, then scale by the weight (transformers' order)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # no rounding between: one pass (C or torch)
        out = cpu_norm.rms_norm(x, weight, eps)
        return out if out is not None else F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor | Linear) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T -> [T, out]; a `Linear` uses its packed form where it has one."""
    if isinstance(weight, Linear):
        return weight(x)
    return plain_linear(x, weight)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor | Linear, down: torch.Tensor | Linear) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); gate_up [2I, H] holds the gate rows, then the up rows. x [T, H] -> [T, H]."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)  # [T, I] each
    return linear(F.silu(gate) * up, down)
