"""Token-efficient expert compute: tokens grouped per expert, never a loop over all experts.

The (token, slot) pairs are sorted by expert once. Two ways to run the groups, same math:
  * per active expert: SwiGLU on its contiguous slice (few active experts, or very uneven groups);
  * one batched matmul over a layer's stacked expert weights, groups zero-padded to the largest
    (decode: most experts active with a few tokens each, where per-expert calls are all overhead).
    Inactive experts in the stack are computed on zeros: a per-expert call costs about what reading four
    experts' weights does, so this pays once a quarter of the held experts are active.
The weighted outputs are summed back per token with one index_add (the pool's partial combine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from services.common.errors import ExpertNotHeldError
from services.common.layers import swiglu

# Groups of up to this many rows are weight-bandwidth bound: padding them to the largest costs no time, while
# one batched call saves a matmul chain per expert. Larger groups are compute bound: run them unpadded.
SMALL_GROUP_ROWS = 32


@dataclass
class StackedExperts:
    """One layer's expert weights stacked: row r holds expert `experts[r]`."""

    row_of_expert: torch.Tensor  # [E] int64, -1 where the expert is not held
    gate_up: torch.Tensor  # [R, 2I, H]
    down: torch.Tensor  # [R, H, I]


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
    order = pair_expert.argsort(stable=True)  # pairs grouped by expert
    experts_sorted = pair_expert[order]  # [P]
    token_of = pair_token[order]  # [P]
    counts = torch.bincount(pair_expert, minlength=num_experts)  # [E]
    out = torch.zeros_like(hidden)
    if pair_expert.numel() == 0:
        return out
    x_sorted = hidden[token_of]  # [P, H]
    w_sorted = pair_weight[order].to(hidden.dtype)  # [P]

    stacked = weights.stacked()
    cap = int(counts.max())
    active = int((counts > 0).sum())
    if stacked is not None and cap <= SMALL_GROUP_ROWS and 4 * active >= stacked.gate_up.shape[0]:
        y = _batched(x_sorted, experts_sorted, counts, cap, stacked)
    else:
        y = _per_expert(x_sorted, counts, weights)
    out.index_add_(0, token_of, y * w_sorted[:, None])
    return out


def _per_expert(x_sorted: torch.Tensor, counts: torch.Tensor, weights: ExpertWeightsSource) -> torch.Tensor:
    outputs = []
    start = 0
    counts_list = counts.tolist()
    for expert in torch.nonzero(counts).flatten().tolist():
        end = start + counts_list[expert]
        outputs.append(swiglu(x_sorted[start:end], *weights.expert(expert)))
        start = end
    return torch.cat(outputs)


def _batched(x_sorted: torch.Tensor, experts_sorted: torch.Tensor, counts: torch.Tensor, cap: int,
             stacked: StackedExperts) -> torch.Tensor:
    rows = stacked.row_of_expert[experts_sorted]  # [P]
    if bool((rows < 0).any()):
        raise ExpertNotHeldError(f"expert {int(experts_sorted[rows < 0][0])} is not held here")
    starts = torch.cumsum(counts, 0) - counts  # [E]
    pos = torch.arange(x_sorted.shape[0]) - starts[experts_sorted]  # [P] position within its group
    r, h = stacked.gate_up.shape[0], x_sorted.shape[1]
    x_pad = x_sorted.new_zeros(r, cap, h)  # [R, cap, H]
    x_pad[rows, pos] = x_sorted
    gate, up = torch.bmm(x_pad, stacked.gate_up.transpose(1, 2)).chunk(2, dim=-1)  # [R, cap, I] each
    y_pad = torch.bmm(F.silu(gate) * up, stacked.down.transpose(1, 2))  # [R, cap, H]
    return y_pad[rows, pos]  # [P, H]
