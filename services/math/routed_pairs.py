"""A batch's top-k routing as flat (token, expert, weight) pairs: the one form in which the gateway splits a
batch over pools and a pool (or the in-process engine) runs grouped expert compute.

`RoutedPairs.from_topk` is the only place where top-k routing is flattened; the dispatch codec splits pairs over
the pools chosen for them (services.dispatch.codec.split_for_pools), `cat` joins them back (failover re-sends
the pairs of failed calls).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutedPairs:
    token: torch.Tensor  # [P] int64: row of the batch's hidden states
    expert: torch.Tensor  # [P] int64: logical expert id
    weight: torch.Tensor  # [P] float32: routing weight

    @classmethod
    def from_topk(cls, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> RoutedPairs:
        """topk_idx [T, K], topk_w [T, K] -> T*K pairs, token-major (token t's K pairs are adjacent)."""
        t, k = topk_idx.shape
        return cls(
            torch.arange(t).repeat_interleave(k),
            topk_idx.reshape(-1).to(torch.int64),
            topk_w.reshape(-1).to(torch.float32),
        )

    @classmethod
    def empty(cls) -> RoutedPairs:
        return cls(
            torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float32)
        )

    @classmethod
    def cat(cls, parts: Sequence[RoutedPairs]) -> RoutedPairs:
        if not parts:
            return cls.empty()
        return cls(
            torch.cat([p.token for p in parts]),
            torch.cat([p.expert for p in parts]),
            torch.cat([p.weight for p in parts]),
        )

    def __len__(self) -> int:
        return self.token.numel()
