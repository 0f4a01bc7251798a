"""The CUDA expert path, run on CPU: the store's FP8 stack and FP8 grouped compute (kernels' torch references on
CPU tensors; the Triton kernels themselves are compared with those references in test_kernels.py), a pool and
the in-process engine computing through it, and the device flag's resolution."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kernels import reference
from services.dispatch import codec, precision
from services.errors import ExpertNotHeldError
from services.expert.grouped import grouped_pairs_forward
from services.expert.server import ExpertPoolServicer
from services.expert.store import ExpertStore, LayerWeights
from services.format.checkpoint import CheckpointReader
from services.math.routed_pairs import RoutedPairs

LAYER = 1


@pytest.fixture
def store(tiny_fp8):
    s = ExpertStore(CheckpointReader(tiny_fp8), fp8_compute=True)
    for e in (0, 3, 7, 8):
        s.load(LAYER, e)
    return s


def _one_pair_at_a_time(store: ExpertStore, hidden: torch.Tensor, pairs: RoutedPairs) -> torch.Tensor:
    """Each pair alone through the reference FP8 MLP of its expert's own (unstacked) weights, summed per token."""
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    for t, e, w in zip(pairs.token.tolist(), pairs.expert.tolist(), pairs.weight.tolist()):
        ew = store.load(LAYER, e)
        pieces = [p[None] for lw in (ew.gate, ew.up, ew.down) for p in (lw.weight, lw.scale_inv)]
        out[t] += w * reference.grouped_fp8_mlp(hidden[t : t + 1], *pieces, [1], [0])[0]
    return out


@pytest.mark.parametrize("experts", [[[7, 0], [0, 8], [3, 0]], [[8, 3]]])  # uneven groups; one token
def test_fp8_grouped_forward_equals_each_pair_alone(store, experts):
    idx = torch.tensor(experts)
    w = torch.rand(idx.shape)
    hidden = torch.randn(idx.shape[0], store.cfg.hidden_size).to(torch.bfloat16)
    got = grouped_pairs_forward(
        hidden, RoutedPairs.from_topk(idx, w), LayerWeights(store, LAYER, torch.bfloat16), store.cfg.n_routed_experts
    )
    assert got.dtype == torch.bfloat16 and LayerWeights(store, LAYER, torch.bfloat16).stacked() is None
    expect = _one_pair_at_a_time(store, hidden, RoutedPairs.from_topk(idx, w))
    torch.testing.assert_close(got.float(), expect.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


def test_fp8_grouped_forward_is_close_to_the_dense_experts(store):
    idx = torch.randint(0, 4, (12, 2))
    idx = torch.tensor([0, 3, 7, 8])[idx]
    w = torch.rand(idx.shape)
    hidden = torch.randn(12, store.cfg.hidden_size)
    pairs = RoutedPairs.from_topk(idx, w)
    fp8 = grouped_pairs_forward(hidden.to(torch.bfloat16), pairs, LayerWeights(store, LAYER, torch.bfloat16), 16)
    dense = grouped_pairs_forward(hidden, pairs, LayerWeights(store, LAYER, torch.float32), 16)  # exact: dequantized
    assert (fp8.float() - dense).norm() / dense.norm() < 0.08


def test_the_stack_holds_the_fp8_bytes_once_and_follows_loads(store):
    nbytes = store.nbytes()
    stack = store.fp8_stacked(LAYER)
    assert stack.gate.shape == (4, store.cfg.moe_intermediate_size, store.cfg.hidden_size)
    assert stack.row_of_expert[[0, 3, 7, 8]].tolist() == [0, 1, 2, 3]
    for e in (0, 3, 7, 8):  # every expert's weights are views of the stack
        assert store.load(LAYER, e).down.weight.untyped_storage().data_ptr() == stack.down.untyped_storage().data_ptr()
    assert store.nbytes() == nbytes
    store.unload(LAYER, 3)
    again = store.fp8_stacked(LAYER)
    assert again is not stack and again.gate.shape[0] == 3
    assert store.held_mask(LAYER).nonzero().flatten().tolist() == [0, 7, 8]
    hidden = torch.randn(1, store.cfg.hidden_size, dtype=torch.bfloat16)
    with pytest.raises(ExpertNotHeldError, match="expert 3"):
        grouped_pairs_forward(
            hidden,
            RoutedPairs.from_topk(torch.tensor([[3]]), torch.ones(1, 1)),
            LayerWeights(store, LAYER, torch.bfloat16),
            16,
        )


def test_a_cuda_store_keeps_no_dense_copy(tiny_fp8):
    s = ExpertStore(CheckpointReader(tiny_fp8), cache_dense=True, device="cuda")  # nothing is loaded: no GPU needed
    assert not s.cache_dense and s.fp8_compute and s.uses_fp8(torch.bfloat16) and not s.uses_fp8(torch.float32)
    cpu = ExpertStore(CheckpointReader(tiny_fp8), cache_dense=True)
    assert cpu.cache_dense and not cpu.fp8_compute


class _Context:
    async def abort(self, code, details):
        raise AssertionError(f"{code}: {details}")


def test_a_pool_computing_fp8_experts_answers_fp8_dispatch(store, monkeypatch):
    monkeypatch.setattr(codec, "compute_dtype", lambda wire, device="cpu": torch.bfloat16)  # as on CUDA
    servicer = ExpertPoolServicer(store, "pool-0")
    assert LayerWeights(store, LAYER, torch.bfloat16).fp8() is not None
    try:
        idx, w = torch.tensor([[0, 7], [8, 0], [3, 3]]), torch.rand(3, 2)
        hidden = torch.randn(3, store.cfg.hidden_size)
        pairs = RoutedPairs.from_topk(idx, w)
        rows = codec.DispatchRows(hidden, "fp8")
        response = asyncio.run(servicer.Forward(codec.encode_request(LAYER, rows, pairs)[1], _Context()))
        got = codec.decode_partial(response, 3, store.cfg.hidden_size)
        sent = reference.act_dequant(rows.values, rows.scales).to(torch.bfloat16)  # what the pool decodes
        expect = grouped_pairs_forward(sent, pairs, LayerWeights(store, LAYER, torch.bfloat16), 16)
        torch.testing.assert_close(got, expect.float(), rtol=0, atol=0)
    finally:
        servicer.compute.shutdown(wait=True)


def test_fp8_experts_are_a_cuda_policy():
    assert precision.fp8_experts("cuda") and not precision.fp8_experts("cpu")
