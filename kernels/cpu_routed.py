"""The routed experts' SwiGLU on the CPU as one C kernel (kernels/cpu/routed_swiglu.c), built on first use.

Decode routes a few tokens to each of many experts. torch can only run that as one small GEMM chain per expert
(call overhead and MKL's per-call weight packing) or as every token through every held expert (all the
products, most of them thrown away). The kernel computes only the routed products, reading each weight row
once per expert and reusing it for that expert's tokens, with fp32 accumulation; weights fp32, bf16, or e4m3
with their block scales (each weight the exact value a dequantized fp32 copy holds, from a quarter of the bytes).

kernels/cpu_build.py builds it (with the other CPU kernels) at first use; where it cannot, `library()` is None
and callers use torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.cpu_build import check_status, library

KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2}  # weight dtypes the kernel reads, its codes
E4M3_MAX_SCALE = 2.0**119  # block scales the kernel reads e4m3 with (it multiplies by scale * 2^8, kept finite)
# below this many bytes of weights per thread, one thread (starting one costs more than it saves)
BYTES_PER_THREAD = 8 << 20


def fast_e4m3() -> bool:
    """Whether the kernel converts e4m3 weights through fp16 in hardware (F16C or AVX-512), which makes reading them
    faster than reading fp32 (BENCHMARKS.md); without, its e4m3 path is exact but slower."""
    lib = library()
    return lib is not None and lib.em_e4m3_fast() == 1


def handles(weight: torch.Tensor) -> bool:
    """Whether the kernel can run experts stacked as `weight` (a CPU tensor of a kind it reads, once built)."""
    return weight.device.type == "cpu" and weight.dtype in KINDS and library() is not None


@dataclass(frozen=True)
class KernelWeights:
    """A layer's held experts as the kernel reads them: gate and up [R, I, H] (each expert's rows contiguous,
    `stride` elements apart from one expert to the next), down [R, H, I]; e4m3 with their fp32 128x128 block
    scales [R, ceil(rows/128), ceil(cols/128)] (gate, up, down)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    stride: int
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def dense(cls, gate_up: torch.Tensor, down: torch.Tensor) -> KernelWeights:
        """From a [R, 2I, H] gate_up stack (gate rows, then up rows) and [R, H, I] down, fp32 or bf16."""
        r, i2, h = gate_up.shape
        gate_up, down = gate_up.contiguous(), down.contiguous()
        return cls(gate_up[:, : i2 // 2], gate_up[:, i2 // 2 :], down, i2 * h)._checked()

    @classmethod
    def e4m3(cls, gate, gate_scale, up, up_scale, down, down_scale) -> KernelWeights:
        scales = tuple(s.to(torch.float32).contiguous() for s in (gate_scale, up_scale, down_scale))
        if any(bool((s.abs() >= E4M3_MAX_SCALE).any()) for s in scales):
            raise ValueError(f"e4m3 block scales of {E4M3_MAX_SCALE:g} and above: the kernel does not read them")
        gate, up, down = gate.contiguous(), up.contiguous(), down.contiguous()
        return cls(gate, up, down, gate.shape[1] * gate.shape[2], scales)._checked()

    def _checked(self) -> KernelWeights:
        r, i, h = self.gate.shape
        kind = self.gate.dtype
        if kind not in KINDS or {self.up.dtype, self.down.dtype} != {kind}:
            raise ValueError(f"expert weights of {kind}, {self.up.dtype}, {self.down.dtype}: the kernel reads {KINDS}")
        if self.up.shape != (r, i, h) or self.down.shape != (r, h, i):
            raise ValueError(f"expert stacks {self.gate.shape}, {self.up.shape}, {self.down.shape} disagree")
        for w in (self.gate, self.up):
            if w.stride() != (self.stride, h, 1):
                raise ValueError(f"gate/up strides {w.stride()}: each expert's rows must be contiguous")
        if (self.scales is not None) != (kind == torch.float8_e4m3fn):
            raise ValueError("block scales go with e4m3 weights, and only with them")
        if self.scales is not None:
            blocks = (-(-i // 128), -(-h // 128))
            shapes = ((r, *blocks), (r, *blocks), (r, blocks[1], blocks[0]))
            if tuple(tuple(s.shape) for s in self.scales) != shapes:
                raise ValueError(f"block scales {[tuple(s.shape) for s in self.scales]} do not fit the weights")
        return self


def routed_swiglu(
    x: torch.Tensor, weights: KernelWeights, token: torch.Tensor, row: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """out [T, H] fp32 = sum over pairs p of weight[p] * down_r(silu(gate_r(x[token[p]])) * up_r(x[token[p]])),
    r = row[p] (the expert's row in the stacks). x [T, H]; token, row, weight [P], in any order (the kernel groups
    the pairs by row, after checking every index)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU expert kernel is not available")
    r, i, h = weights.gate.shape
    if x.dim() != 2 or x.shape[1] != h:
        raise ValueError(f"activations {tuple(x.shape)} for experts of hidden size {h}")
    if not token.shape == row.shape == weight.shape or token.dim() != 1:
        raise ValueError(
            f"pairs of {tuple(token.shape)} tokens, {tuple(row.shape)} rows, {tuple(weight.shape)} weights"
        )
    x = x.to(torch.float32).contiguous()
    token, row = token.to(torch.int64).contiguous(), row.to(torch.int64).contiguous()
    weight = weight.to(torch.float32).contiguous()
    out = torch.zeros(x.shape[0], h)  # [T, H]
    # threads by the weights the pairs may touch (at most every held expert), counted as fp32 bytes: e4m3 reads
    # fewer bytes but converts each weight, work of the same order
    touched = min(len(token), r) * 3 * i * h * 4
    threads = max(1, min(torch.get_num_threads(), touched // BYTES_PER_THREAD))
    scales = [s.data_ptr() for s in weights.scales] if weights.scales is not None else [None] * 3
    rc = lib.em_routed_swiglu(
        KINDS[weights.gate.dtype],
        x.data_ptr(),
        x.shape[0],
        weights.gate.data_ptr(),
        weights.up.data_ptr(),
        weights.down.data_ptr(),
        *scales,
        weights.stride,
        h,
        i,
        r,
        token.data_ptr(),
        row.data_ptr(),
        weight.data_ptr(),
        len(token),
        out.data_ptr(),
        threads,
    )
    check_status(
        rc,
        "expert",
        {-2: f"a pair's token is outside 0..{x.shape[0] - 1}", -3: f"a pair's stack row is outside 0..{r - 1}"},
    )
    return out
