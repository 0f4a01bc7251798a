"""Token-efficient expert compute: tokens grouped per expert, one matmul chain per active expert.

The (token, slot) pairs are sorted by expert once; each active expert runs SwiGLU on its contiguous slice; the
weighted outputs are summed back per token with one index_add. Experts that received no token cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.common.layers import swiglu

WeightsFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # expert id -> (gate_up [2I, H], down [H, I])


def grouped_expert_forward(hidden: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor,
                           weights_of: WeightsFn, num_experts: int) -> torch.Tensor:
    """hidden [T, H], topk_idx [T, K], topk_w [T, K] -> [T, H] = sum_k w[t,k] * expert_{idx[t,k]}(hidden[t])."""
    t, k = topk_idx.shape
    flat = topk_idx.reshape(-1)  # [T*K]
    order = flat.argsort(stable=True)  # [T*K] pairs grouped by expert
    token_of = order // k  # [T*K]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    x_sorted = hidden[token_of]  # [T*K, H]
    w_sorted = topk_w.reshape(-1)[order].to(hidden.dtype)  # [T*K]
    outputs = []
    start = 0
    for expert in torch.nonzero(torch.tensor(counts)).flatten().tolist():
        end = start + counts[expert]
        gate_up, down = weights_of(expert)
        outputs.append(swiglu(x_sorted[start:end], gate_up, down) * w_sorted[start:end, None])
        start = end
    out = torch.zeros_like(hidden)
    if outputs:
        out.index_add_(0, token_of, torch.cat(outputs))
    return out
