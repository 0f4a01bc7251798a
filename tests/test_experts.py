"""Routed-expert compute: the grouped forms against a plain per-token loop, and partial expert stores."""

from __future__ import annotations

import pytest
import torch

from services.common.checkpoint import CheckpointReader
from services.common.errors import ExpertNotHeldError, InvalidRequestError
from services.common.layers import swiglu
from services.expert.grouped import grouped_expert_forward
from services.expert.store import ExpertStore, LayerWeights


class _Source(LayerWeights):
    def __init__(self, store, layer, stacked):
        super().__init__(store, layer)
        self.use_stack = stacked

    def stacked(self):
        return super().stacked() if self.use_stack else None


@pytest.fixture(scope="module")
def store(tiny_fp8):
    s = ExpertStore(CheckpointReader(tiny_fp8), cache_dense=True)
    for e in range(s.cfg.n_routed_experts):
        s.load(1, e)
    return s


def _reference(store, hidden, idx, w):
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(idx.shape[1]):
            gate_up, down = store.compute_weights(1, int(idx[t, k]))
            out[t] += w[t, k] * swiglu(hidden[t : t + 1], gate_up, down)[0]
    return out


@pytest.mark.parametrize("tokens", [1, 7, 40])
@pytest.mark.parametrize("stacked", [False, True])
def test_grouped_equals_per_token_loop(store, tokens, stacked):
    g = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, store.cfg.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(tokens)])
    w = torch.rand(tokens, 4, generator=g)
    ours = grouped_expert_forward(hidden, idx, w, _Source(store, 1, stacked), 16)
    torch.testing.assert_close(ours, _reference(store, hidden, idx, w), rtol=1e-5, atol=1e-5)


def test_batched_path_is_taken_for_decode_shapes(store, monkeypatch):
    import services.expert.grouped as grouped

    calls = []
    real = grouped._per_expert
    monkeypatch.setattr(grouped, "_per_expert", lambda *a: calls.append("loop") or real(*a))
    hidden = torch.randn(8, store.cfg.hidden_size)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(8)])
    grouped.grouped_expert_forward(hidden, idx, torch.rand(8, 4), _Source(store, 1, True), 16)
    assert calls == []  # 8 tokens x 4 experts over 16 held: one batched matmul chain, no per-expert loop


def test_partial_store_refuses_experts_it_does_not_hold(tiny_fp8):
    s = ExpertStore(CheckpointReader(tiny_fp8), cache_dense=True)
    s.load(1, 2)
    s.load(1, 5)
    assert s.stacked(1).row_of_expert.tolist().count(-1) == 14
    hidden = torch.randn(3, s.cfg.hidden_size)
    ok = grouped_expert_forward(hidden, torch.tensor([[2, 5]] * 3), torch.ones(3, 2), _Source(s, 1, True), 16)
    assert ok.shape == hidden.shape
    with pytest.raises(ExpertNotHeldError, match="expert 9"):
        grouped_expert_forward(hidden, torch.tensor([[2, 9]] * 3), torch.ones(3, 2), _Source(s, 1, True), 16)
    with pytest.raises(InvalidRequestError, match="not an MoE layer"):
        s.load(0, 1)
    s.unload(1, 5)
    assert s.loaded() == [(1, 2)] and s.stacked(1).gate_up.shape[0] == 1
