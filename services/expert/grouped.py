"""Token-efficient expert compute: tokens grouped per expert, never a loop over all experts.

On CUDA (reduced-precision dispatch) the experts stay FP8: the pairs are sorted by expert on the host and the
whole layer runs as block-scaled FP8 grouped GEMMs over the layer's e4m3 stack (`Fp8Experts`,
kernels.grouped_fp8_mlp: three Triton launches whatever the number of experts). Elsewhere the weights are
dense in the compute dtype. The (token, slot) pairs are sorted by expert once. Three ways to run the groups, same
math:
  * per active expert: SwiGLU on its contiguous slice (few active experts, or very uneven groups);
  * where torch has no packed CPU GEMM (CUDA): one batched matmul over a layer's stacked expert weights,
    groups zero-padded to the largest (decode: most experts active with a few tokens each, where per-expert
    calls are all overhead). Inactive experts in the stack are computed on zeros, which pays once a quarter
    of the held experts are active;
  * on CPU, decode-sized groups (a few tokens per expert) through one C kernel (kernels.cpu_routed: only the
    routed products, each weight row read once per expert), where the machine has a C compiler;
  * on CPU with oneDNN and no C kernel, when a cost model says so (decode-sized batches over many active
    experts), every token through all held experts as two packed GEMMs (gate/up of all experts at once, then
    one down projection over the routing-weighted activations, zero for experts a token does not use). Each
    weight is read once with no per-call packing (MKL re-packs the weight on every call, which dominates at a few rows).
The weighted outputs are summed back per token with one index_add (the pool's partial combine).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

import kernels
from kernels import cpu_routed
from services.errors import ExpertNotHeldError
from services.math.layers import swiglu
from services.math.packed_linear import Linear, packing_available
from services.math.routed_pairs import RoutedPairs

# The C kernel while active experts get at most this many rows on average: at more, per-expert GEMMs (MKL) compute
# faster than its dot products (BENCHMARKS.md, "Routed experts as one C kernel"); on e4m3 weights (a quarter of
# the bytes, converted as they are read) it holds out longer (BENCHMARKS.md, "e4m3 weights converted through fp16")
KERNEL_MAX_ROWS_PER_EXPERT = 8
KERNEL_E4M3_MAX_ROWS_PER_EXPERT = 24
# Groups of up to this many rows are weight-bandwidth bound: padding them to the largest costs no time, while
# one batched call saves a matmul chain per expert. Larger groups are compute bound: run them unpadded.
SMALL_GROUP_ROWS = 32
# CPU cost model choosing between the packed all-experts GEMMs (every token through every held expert: more
# products, each weight read once) and one SwiGLU per active expert (only the routed products, a fixed cost per
# call and per-call weight packing). Rates fitted on a 2-core AVX-512 machine at the `small` preset's sizes; the
# timings they were fitted to are in BENCHMARKS.md ("All experts as two packed GEMMs for decode").
PACKED_FLOPS_PER_THREAD = {torch.float32: 70e9, torch.bfloat16: 200e9}  # FLOP/s of one thread, packed GEMMs
MEMORY_BYTES_PER_S = 20e9  # weight streaming, all threads
EXPERT_CALL_S = 100e-6  # fixed cost of one expert's SwiGLU (three calls, slicing)
ONE_CALL_BYTES_PER_S = 10e9  # weight streaming of one small GEMM


@dataclass
class StackedExperts:
    """One layer's expert weights stacked: row r holds expert `experts[r]`."""

    row_of_expert: torch.Tensor  # [E] int64, -1 where the expert is not held
    gate_up: torch.Tensor  # [R, 2I, H]
    down: torch.Tensor  # [R, H, I]
    gate_up_all: Linear | None = None  # [R * 2I, H] packed, rows expert-major (CPU with oneDNN only)
    down_all: Linear | None = None  # [H, R * I] packed, columns expert-major
    kernel: cpu_routed.KernelWeights | None = None  # the plain stacks as the CPU kernel reads them

    @classmethod
    def build(cls, row_of_expert: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> StackedExperts:
        """The packed copies only where the C kernel cannot run these experts (it reads the plain stacks)."""
        if cpu_routed.handles(gate_up):
            return cls(row_of_expert, gate_up, down, kernel=cpu_routed.KernelWeights.dense(gate_up, down))
        if gate_up.device.type != "cpu" or not packing_available(gate_up.dtype):
            return cls(row_of_expert, gate_up, down)
        r, h, i = down.shape
        return cls(
            row_of_expert,
            gate_up,
            down,  # the plain stacks stay for the other paths; the packed are extra
            Linear(gate_up.reshape(r * 2 * i, h), pack=True, keep_plain=False),
            Linear(down.permute(1, 0, 2).reshape(h, r * i), pack=True, keep_plain=False),
        )


@dataclass
class Fp8Experts:
    """One layer's held experts as e4m3 stacks with their 128x128 block scales: row r holds expert `experts[r]`."""

    row_of_expert: torch.Tensor  # [E] int64 on the host, -1 where the expert is not held
    gate: torch.Tensor  # [R, I, H] e4m3
    gate_scale: torch.Tensor  # [R, ceil(I/128), ceil(H/128)] fp32
    up: torch.Tensor  # [R, I, H] e4m3
    up_scale: torch.Tensor
    down: torch.Tensor  # [R, H, I] e4m3
    down_scale: torch.Tensor  # [R, ceil(H/128), ceil(I/128)] fp32

    @functools.cached_property
    def kernel(self) -> cpu_routed.KernelWeights | None:
        """The e4m3 stacks as the CPU kernel reads them (views, no copy); None for scales it does not read."""
        try:
            return cpu_routed.KernelWeights.e4m3(
                self.gate, self.gate_scale, self.up, self.up_scale, self.down, self.down_scale
            )
        except ValueError:
            return None

    def mlp(self, x_sorted: torch.Tensor, counts: list[int], rows: list[int]) -> torch.Tensor:
        """x_sorted [P, H] sorted by expert (counts[g] rows through stack row rows[g]) -> [P, H] fp32."""
        return kernels.grouped_fp8_mlp(
            x_sorted,
            self.gate,
            self.gate_scale,
            self.up,
            self.up_scale,
            self.down,
            self.down_scale,
            counts,
            rows,
            torch.float32,
        )


class ExpertWeightsSource(Protocol):
    def expert(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> gate_up [2I, H], down [H, I]."""
        ...

    def stacked(self) -> StackedExperts | None: ...

    def fp8(self) -> Fp8Experts | None:
        """The FP8 stack, when this source computes its experts as FP8 GEMMs."""
        ...

    def fp8_kernel(self) -> Fp8Experts | None:
        """The FP8 stack for the CPU kernel (which reads e4m3), where it is to run on it."""
        ...


def grouped_expert_forward(
    hidden: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, weights: ExpertWeightsSource, num_experts: int
) -> torch.Tensor:
    """hidden [T, H], topk_idx [T, K], topk_w [T, K] -> [T, H] = sum_k w[t,k] * expert_{idx[t,k]}(hidden[t])."""
    return grouped_pairs_forward(hidden, RoutedPairs.from_topk(topk_idx, topk_w), weights, num_experts)


def grouped_pairs_forward(
    hidden: torch.Tensor, pairs: RoutedPairs, weights: ExpertWeightsSource, num_experts: int
) -> torch.Tensor:
    """The same over flat (token, expert, weight) pairs (a pool's share of a batch): hidden [N, H] -> [N, H]."""
    if len(pairs) == 0:
        return torch.zeros_like(hidden)
    fp8 = weights.fp8() if hasattr(weights, "fp8") else None
    if fp8 is not None:
        return _fp8_grouped(hidden, pairs, fp8, num_experts)
    pairs = _on(pairs, hidden.device)
    counts = torch.bincount(pairs.expert, minlength=num_experts)  # [E]
    stacked = weights.stacked()
    active = int((counts > 0).sum())
    kernel = _kernel_weights(hidden, stacked, weights)
    if kernel is not None and len(pairs) <= kernel[2] * active:
        return _routed_kernel(hidden, pairs, *kernel[:2])
    packed = stacked is not None and stacked.gate_up_all is not None
    if packed and _all_experts_pays(hidden, stacked, active):
        return _all_experts(hidden, pairs, stacked)
    # larger groups beside the kernel: per-expert GEMMs (the padded batch is for devices without the kernel)
    mostly_active = not packed and kernel is None and stacked is not None and 4 * active >= stacked.gate_up.shape[0]

    order = pairs.expert.argsort(stable=True)  # pairs grouped by expert
    experts_sorted = pairs.expert[order]  # [P]
    token_of = pairs.token[order]  # [P]
    w_sorted = pairs.weight[order].to(hidden.dtype)  # [P]
    cap = int(counts.max())
    if mostly_active and cap <= SMALL_GROUP_ROWS:
        y = _batched(hidden[token_of], experts_sorted, counts, cap, stacked)  # [P, H]
        return torch.zeros_like(hidden).index_add_(0, token_of, y * w_sorted[:, None])
    return _per_expert(hidden, token_of, w_sorted, counts, weights)


def _per_expert(
    hidden: torch.Tensor,
    token_of: torch.Tensor,
    w_sorted: torch.Tensor,
    counts: torch.Tensor,
    weights: ExpertWeightsSource,
) -> torch.Tensor:
    """Each active expert's SwiGLU on its tokens' rows, weighted and added into their outputs -> [N, H]. No
    [P, H] copy of the gathered inputs, outputs or weighted outputs: at a prefill those are tens of MB a layer,
    each a pass over freshly mapped memory (the same sums, in the same order: expert by expert)."""
    out = torch.zeros_like(hidden)
    start = 0
    counts_list = counts.tolist()
    for expert in torch.nonzero(counts).flatten().tolist():
        end = start + counts_list[expert]
        tokens = token_of[start:end]  # [n]
        y = swiglu(hidden.index_select(0, tokens), *weights.expert(expert))  # [n, H]
        out.index_add_(0, tokens, y.mul_(w_sorted[start:end, None]))
        start = end
    return out


def _kernel_weights(
    hidden: torch.Tensor, stacked: StackedExperts | None, weights: ExpertWeightsSource
) -> tuple[cpu_routed.KernelWeights, torch.Tensor, int] | None:
    """(the CPU kernel's view of the experts, row_of_expert, the most rows per active expert it is used for) where
    it can run them: the e4m3 stack where the source gives one, else the dense stack."""
    if hidden.device.type != "cpu":
        return None
    fp8 = weights.fp8_kernel() if hasattr(weights, "fp8_kernel") else None
    if fp8 is not None and cpu_routed.handles(fp8.gate) and fp8.kernel is not None:
        return fp8.kernel, fp8.row_of_expert, KERNEL_E4M3_MAX_ROWS_PER_EXPERT
    if stacked is not None and stacked.kernel is not None:
        return stacked.kernel, stacked.row_of_expert, KERNEL_MAX_ROWS_PER_EXPERT
    return None


def _routed_kernel(
    hidden: torch.Tensor, pairs: RoutedPairs, weights: cpu_routed.KernelWeights, row_of_expert: torch.Tensor
) -> torch.Tensor:
    """The pairs through the C kernel (it groups them by expert): [N, H] in hidden's dtype (accumulated in fp32)."""
    rows = row_of_expert[pairs.expert]  # [P]
    try:
        out = cpu_routed.routed_swiglu(hidden, weights, pairs.token, rows, pairs.weight)
    except ValueError:
        _rows(row_of_expert, pairs.expert)  # an expert not held here is named as such
        raise
    return out.to(hidden.dtype)


def _all_experts_pays(hidden: torch.Tensor, stacked: StackedExperts, active: int) -> bool:
    """Whether every token through every held expert (packed) costs less than a SwiGLU per active expert."""
    t = hidden.shape[0]
    r, h, i = stacked.down.shape
    expert_bytes = 3 * h * i * hidden.element_size()
    flops = PACKED_FLOPS_PER_THREAD.get(hidden.dtype, PACKED_FLOPS_PER_THREAD[torch.float32])
    all_experts = max(t * r * 6.0 * h * i / (flops * torch.get_num_threads()), r * expert_bytes / MEMORY_BYTES_PER_S)
    per_expert = active * (EXPERT_CALL_S + expert_bytes / ONE_CALL_BYTES_PER_S)
    return all_experts < per_expert


def _rows(row_of_expert: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    rows = row_of_expert[experts]  # [P]
    if bool((rows < 0).any()):
        raise ExpertNotHeldError(f"expert {int(experts[rows < 0][0])} is not held here")
    return rows


def _all_experts(hidden: torch.Tensor, pairs: RoutedPairs, stacked: StackedExperts) -> torch.Tensor:
    """Every token through every held expert, weighted by its routing weight (0 where not routed): [T, H]."""
    t = hidden.shape[0]
    r, _, i = stacked.down.shape
    rows = _rows(stacked.row_of_expert, pairs.expert)  # [P]
    weight = hidden.new_zeros(t, r).index_put_((pairs.token, rows), pairs.weight.to(hidden.dtype), accumulate=True)
    gate, up = stacked.gate_up_all(hidden).view(t, r, 2, i).unbind(2)  # [T, R, I] each
    act = F.silu(gate) * up * weight[:, :, None]  # [T, R, I]
    return stacked.down_all(act.reshape(t, r * i))  # [T, H]


def _batched(
    x_sorted: torch.Tensor, experts_sorted: torch.Tensor, counts: torch.Tensor, cap: int, stacked: StackedExperts
) -> torch.Tensor:
    rows = _rows(stacked.row_of_expert, experts_sorted)  # [P]
    starts = torch.cumsum(counts, 0) - counts  # [E]
    pos = torch.arange(x_sorted.shape[0]) - starts[experts_sorted]  # [P] position within its group
    r, h = stacked.gate_up.shape[0], x_sorted.shape[1]
    x_pad = x_sorted.new_zeros(r, cap, h)  # [R, cap, H]
    x_pad[rows, pos] = x_sorted
    gate, up = torch.bmm(x_pad, stacked.gate_up.transpose(1, 2)).chunk(2, dim=-1)  # [R, cap, I] each
    y_pad = torch.bmm(F.silu(gate) * up, stacked.down.transpose(1, 2))  # [R, cap, H]
    return y_pad[rows, pos]  # [P, H]


def _on(pairs: RoutedPairs, device: torch.device) -> RoutedPairs:
    if pairs.token.device == device and pairs.expert.device == device and pairs.weight.device == device:
        return pairs
    return RoutedPairs(pairs.token.to(device), pairs.expert.to(device), pairs.weight.to(device))


def _fp8_grouped(hidden: torch.Tensor, pairs: RoutedPairs, stack: Fp8Experts, num_experts: int) -> torch.Tensor:
    """The pairs sorted by expert on the host (one small copy when routing comes from a GPU), the groups through
    the FP8 grouped GEMMs on the device, the weighted outputs summed per token in fp32."""
    expert = pairs.expert.cpu()  # [P]
    counts = torch.bincount(expert, minlength=num_experts)  # [E]
    active = torch.nonzero(counts).flatten()  # [G] ascending: the sorted pairs' group order
    rows = stack.row_of_expert[active]  # [G]
    if bool((rows < 0).any()):
        raise ExpertNotHeldError(f"expert {int(active[rows < 0][0])} is not held here")
    order = expert.argsort(stable=True).to(hidden.device)  # [P]
    token = pairs.token.to(hidden.device)[order]  # [P]
    weight = pairs.weight.to(hidden.device, torch.float32)[order]  # [P]
    y = stack.mlp(hidden[token], counts[active].tolist(), rows.tolist())  # [P, H] fp32
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    return out.index_add_(0, token, y * weight[:, None]).to(hidden.dtype)
