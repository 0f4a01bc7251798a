"""The experts seam: how the gateway's MoE layers reach routed experts.

In-process experts (the monolithic engine, tests) and remote experts (gRPC to expert pools) implement the same
interface, so the distributed path is the monolithic path with another backend. `start` begins the work and
returns a function that waits for the result, so the gateway runs the shared expert while pools compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

Pending = Callable[[], torch.Tensor]


class ExpertsBackend(Protocol):
    def start(self, layer: int, hidden: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> Pending:
        """hidden [T, H], topk_idx [T, K] (logical expert ids), topk_w [T, K] -> a wait for
        sum_k w[t,k] * expert_k(hidden[t]), [T, H]."""
        ...
