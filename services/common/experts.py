"""The experts seam: how the gateway's MoE layers reach routed experts.

In-process experts (the monolithic engine, tests) and remote experts (gRPC to expert pools) implement the same
interface, so the distributed path is the monolithic path with another backend.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ExpertsBackend(Protocol):
    def forward(self, layer: int, hidden: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], topk_idx [T, K] (logical expert ids), topk_w [T, K] -> sum_k w[t,k] * expert_k(h[t]), [T, H]."""
        ...
