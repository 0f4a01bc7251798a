"""The DeepSeek-V3 router: sigmoid scores, group-limited top-k with an fp32 correction bias for selection only.

1. scores = sigmoid(x W^T) in fp32.
2. choice = scores + e_score_correction_bias (selection only).
3. group score = sum of each group's top-2 choice scores; keep the best `topk_group` groups, others -> -inf.
4. top-k experts by choice score; weights = their *unbiased* scores, normalised to sum 1 (norm_topk_prob),
   times routed_scaling_factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import cpu_router
from services.format.config import ModelConfig
from services.math.layers import linear


@dataclass
class Router:
    cfg: ModelConfig
    weight: torch.Tensor  # [E, H]
    bias: torch.Tensor  # [E] fp32

    def __post_init__(self):
        self.weight = self.weight.to(torch.float32)
        self.bias = self.bias.to(torch.float32)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> topk_idx [T, K] int64, topk_w [T, K] fp32."""
        cfg = self.cfg
        scores = linear(x.to(torch.float32), self.weight).sigmoid()  # [T, E]
        chosen = cpu_router.route(
            scores, self.bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, cfg.norm_topk_prob,
            cfg.routed_scaling_factor,
        )  # fmt: skip
        return chosen if chosen is not None else self.choose(scores)

    def choose(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scores [T, E] fp32 (sigmoid) -> (topk_idx [T, K], topk_w [T, K]) in torch (steps 2-4; kernels/cpu_router.py
        is the same in one C call)."""
        cfg = self.cfg
        t = scores.shape[0]
        choice = scores + self.bias  # [T, E]
        if cfg.n_group > 1:
            grouped = choice.view(t, cfg.n_group, cfg.experts_per_group)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            keep = group_scores.topk(cfg.topk_group, dim=-1).indices  # [T, topk_group]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(t, -1)
        topk_idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # [T, K]
        topk_w = scores.gather(1, topk_idx)  # [T, K] unbiased
        if cfg.norm_topk_prob:
            topk_w = topk_w / (topk_w.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_w * cfg.routed_scaling_factor
