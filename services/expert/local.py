"""In-process routed experts: the experts interface served from a local ExpertStore."""

from __future__ import annotations

import torch

from services.expert.grouped import grouped_expert_forward
from services.expert.store import ExpertStore


class LocalExperts:
    def __init__(self, store: ExpertStore):
        self.store = store

    @classmethod
    def load_all(cls, store: ExpertStore, progress=None) -> "LocalExperts":
        cfg = store.cfg
        total = len(cfg.moe_layers) * cfg.n_routed_experts
        done = 0
        for layer in cfg.moe_layers:
            for expert in range(cfg.n_routed_experts):
                store.load(layer, expert)
                if store.cache_dense:
                    store.compute_weights(layer, expert)
                done += 1
                if progress:
                    progress(done, total)
        return cls(store)

    def forward(self, layer: int, hidden: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        return grouped_expert_forward(hidden, topk_idx, topk_w, lambda e: self.store.compute_weights(layer, e),
                                      self.store.cfg.n_routed_experts)
