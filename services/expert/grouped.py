"""Token-efficient expert compute: tokens grouped per expert, never a loop over all experts.

The (token, slot) pairs are sorted by expert once. Three ways to run the groups, same math:
  * per active expert: SwiGLU on its contiguous slice (few active experts, or very uneven groups);
  * where torch has no packed CPU GEMM (CUDA): one batched matmul over a layer's stacked expert weights,
    groups zero-padded to the largest (decode: most experts active with a few tokens each, where per-expert
    calls are all overhead). Inactive experts in the stack are computed on zeros, which pays once a quarter
    of the held experts are active;
  * on CPU with oneDNN, when a cost model says so (decode-sized batches over many active experts), every token
    through all held experts as two packed GEMMs (gate/up of all experts at once, then one down projection
    over the routing-weighted activations, zero for experts a token does not use). Each weight is read once
    with no per-call packing (MKL re-packs the weight on every call, which dominates at a few rows).
The weighted outputs are summed back per token with one index_add (the pool's partial combine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from services.errors import ExpertNotHeldError
from services.math.layers import swiglu
from services.math.packed_linear import Linear, packing_available

# Groups of up to this many rows are weight-bandwidth bound: padding them to the largest costs no time, while
# one batched call saves a matmul chain per expert. Larger groups are compute bound: run them unpadded.
SMALL_GROUP_ROWS = 32
# CPU cost model choosing between the packed all-experts GEMMs and one SwiGLU per active expert, fitted on the
# CI machine (2 cores, AVX-512) at the `small` preset's sizes (H 512, I 128), float32, per MoE layer:
#   all experts (T tokens, R held): 5.7-6.1 ms at T=32, R=64, 2 threads; 5.6-6.3 ms at T=32, R=32, 1 thread;
#     3.3-3.7 ms at T=8, R=64, 2 threads (the weight-streaming floor)
#   per active expert: 6.7-9.3 ms for 44 active, 2 threads; 4.4-5.2 ms for 23 active, 1 thread
# so in float32 the packed GEMMs win in the engine's decode (2 threads, 64 experts) and lose in a 1-thread pool
# holding 32. bfloat16 (AVX512-BF16), 1 thread, R=32: all experts 0.72 / 0.96 / 1.42 / 2.34 / 4.45 ms at
# T = 4 / 8 / 16 / 32 / 64; per active expert 0.55 ms for 4 active, 3.8 ms for 31.
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

    @classmethod
    def build(cls, row_of_expert: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> "StackedExperts":
        if gate_up.device.type != "cpu" or not packing_available():
            return cls(row_of_expert, gate_up, down)
        r, h, i = down.shape
        return cls(row_of_expert, gate_up, down,  # the plain stacks stay for the other paths; the packed are extra
                   Linear(gate_up.reshape(r * 2 * i, h), pack=True, keep_plain=False),
                   Linear(down.permute(1, 0, 2).reshape(h, r * i), pack=True, keep_plain=False))


class ExpertWeightsSource(Protocol):
    def expert(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> gate_up [2I, H], down [H, I]."""
        ...

    def stacked(self) -> StackedExperts | None:
        ...


def grouped_expert_forward(hidden: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor,
                           weights: ExpertWeightsSource, num_experts: int) -> torch.Tensor:
    """hidden [T, H], topk_idx [T, K], topk_w [T, K] -> [T, H] = sum_k w[t,k] * expert_{idx[t,k]}(hidden[t])."""
    t, k = topk_idx.shape
    pair_token = torch.arange(t).repeat_interleave(k)  # [T*K]
    return grouped_pairs_forward(hidden, pair_token, topk_idx.reshape(-1), topk_w.reshape(-1), weights, num_experts)


def grouped_pairs_forward(hidden: torch.Tensor, pair_token: torch.Tensor, pair_expert: torch.Tensor,
                          pair_weight: torch.Tensor, weights: ExpertWeightsSource, num_experts: int) -> torch.Tensor:
    """The same over flat (token, expert, weight) pairs [P] (a pool's share of a batch): -> [T, H]."""
    if pair_expert.numel() == 0:
        return torch.zeros_like(hidden)
    counts = torch.bincount(pair_expert, minlength=num_experts)  # [E]
    stacked = weights.stacked()
    active = int((counts > 0).sum())
    packed = stacked is not None and stacked.gate_up_all is not None
    if packed and _all_experts_pays(hidden, stacked, active):
        return _all_experts(hidden, pair_token, pair_expert, pair_weight, stacked)
    mostly_active = not packed and stacked is not None and 4 * active >= stacked.gate_up.shape[0]

    order = pair_expert.argsort(stable=True)  # pairs grouped by expert
    experts_sorted = pair_expert[order]  # [P]
    token_of = pair_token[order]  # [P]
    x_sorted = hidden[token_of]  # [P, H]
    w_sorted = pair_weight[order].to(hidden.dtype)  # [P]
    cap = int(counts.max())
    if mostly_active and cap <= SMALL_GROUP_ROWS:
        y = _batched(x_sorted, experts_sorted, counts, cap, stacked)
    else:
        y = _per_expert(x_sorted, counts, weights)
    return torch.zeros_like(hidden).index_add_(0, token_of, y * w_sorted[:, None])


def _per_expert(x_sorted: torch.Tensor, counts: torch.Tensor, weights: ExpertWeightsSource) -> torch.Tensor:
    outputs = []
    start = 0
    counts_list = counts.tolist()
    for expert in torch.nonzero(counts).flatten().tolist():
        end = start + counts_list[expert]
        outputs.append(swiglu(x_sorted[start:end], *weights.expert(expert)))
        start = end
    return torch.cat(outputs)


def _all_experts_pays(hidden: torch.Tensor, stacked: StackedExperts, active: int) -> bool:
    """Whether every token through every held expert (packed) costs less than a SwiGLU per active expert."""
    t = hidden.shape[0]
    r, h, i = stacked.down.shape
    expert_bytes = 3 * h * i * hidden.element_size()
    flops = PACKED_FLOPS_PER_THREAD.get(hidden.dtype, PACKED_FLOPS_PER_THREAD[torch.float32])
    all_experts = max(t * r * 6.0 * h * i / (flops * torch.get_num_threads()),
                      r * expert_bytes / MEMORY_BYTES_PER_S)
    per_expert = active * (EXPERT_CALL_S + expert_bytes / ONE_CALL_BYTES_PER_S)
    return all_experts < per_expert


def _rows(stacked: StackedExperts, experts: torch.Tensor) -> torch.Tensor:
    rows = stacked.row_of_expert[experts]  # [P]
    if bool((rows < 0).any()):
        raise ExpertNotHeldError(f"expert {int(experts[rows < 0][0])} is not held here")
    return rows


def _all_experts(hidden: torch.Tensor, pair_token: torch.Tensor, pair_expert: torch.Tensor,
                 pair_weight: torch.Tensor, stacked: StackedExperts) -> torch.Tensor:
    """Every token through every held expert, weighted by its routing weight (0 where not routed): [T, H]."""
    t = hidden.shape[0]
    r, _, i = stacked.down.shape
    rows = _rows(stacked, pair_expert)  # [P]
    weight = hidden.new_zeros(t, r).index_put_((pair_token, rows), pair_weight.to(hidden.dtype), accumulate=True)
    gate, up = stacked.gate_up_all(hidden).view(t, r, 2, i).unbind(2)  # [T, R, I] each
    act = F.silu(gate) * up * weight[:, :, None]  # [T, R, I]
    return stacked.down_all(act.reshape(t, r * i))  # [T, H]


def _batched(x_sorted: torch.Tensor, experts_sorted: torch.Tensor, counts: torch.Tensor, cap: int,
             stacked: StackedExperts) -> torch.Tensor:
    rows = _rows(stacked, experts_sorted)  # [P]
    starts = torch.cumsum(counts, 0) - counts  # [E]
    pos = torch.arange(x_sorted.shape[0]) - starts[experts_sorted]  # [P] position within its group
    r, h = stacked.gate_up.shape[0], x_sorted.shape[1]
    x_pad = x_sorted.new_zeros(r, cap, h)  # [R, cap, H]
    x_pad[rows, pos] = x_sorted
    gate, up = torch.bmm(x_pad, stacked.gate_up.transpose(1, 2)).chunk(2, dim=-1)  # [R, cap, I] each
    y_pad = torch.bmm(F.silu(gate) * up, stacked.down.transpose(1, 2))  # [R, cap, H]
    return y_pad[rows, pos]  # [P, H]
