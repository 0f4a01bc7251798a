"""In-process routed experts: the experts interface served from a local ExpertStore."""

from __future__ import annotations

import torch

from services.expert.grouped import grouped_expert_forward
from services.expert.store import ExpertStore, LayerWeights


class LocalExperts:
    def __init__(self, store: ExpertStore):
        self.store = store

    @classmethod
    def load_all(cls, store: ExpertStore, progress=None, layers: list[int] | None = None) -> LocalExperts:
        """Every expert of `layers` (default: every MoE layer, the MTP layers' included)."""
        cfg = store.cfg
        layers = cfg.moe_layers if layers is None else layers
        total = len(layers) * cfg.n_routed_experts
        done = 0
        for layer in layers:
            for expert in range(cfg.n_routed_experts):
                store.load(layer, expert)
                done += 1
                if progress:
                    progress(done, total)
            store.prepare(layer)
        return cls(store)

    def start(self, layer: int, hidden: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor):
        out = grouped_expert_forward(
            hidden, topk_idx, topk_w, LayerWeights(self.store, layer), self.store.cfg.n_routed_experts
        )
        return lambda: out
