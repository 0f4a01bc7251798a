"""A pool's Forward: requests checked by the codec and against what the pool holds, each refusal a status that
names the problem; a valid request equals the in-process expert. The real servicer, called directly."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from services.dispatch import codec, wire
from services.expert.server import ExpertPoolServicer
from services.expert.store import ExpertStore
from services.format.checkpoint import CheckpointReader
from services.math.layers import swiglu
from services.math.routed_pairs import RoutedPairs


class _Aborted(Exception):
    pass


class _Context:
    async def abort(self, code, details):
        raise _Aborted(code, details)


@pytest.fixture(params=[False, True], ids=["fp8-only", "dense-copies"])
def servicer(tiny_fp8, request):
    """A pool as `start_pool` makes it: FP8 weights only (the default), or with dense copies (--dense-experts)."""
    store = ExpertStore(CheckpointReader(tiny_fp8), dtype=torch.float32, cache_dense=request.param)
    s = ExpertPoolServicer(store, "pool-0")
    s.load([(1, 2), (1, 5)])
    yield s
    s.compute.shutdown(wait=True)


def _request(layer: int, experts: list[int], hidden: torch.Tensor):
    pairs = RoutedPairs(torch.arange(len(experts)), torch.tensor(experts), torch.full((len(experts),), 0.5))
    return codec.encode_request(layer, codec.DispatchRows(hidden, "fp32"), pairs)[1]


def _forward(servicer, request):
    return asyncio.run(servicer.Forward(request, _Context()))


@pytest.mark.parametrize(
    "layer,experts,code,message",
    [
        (0, [2, 5], grpc.StatusCode.INVALID_ARGUMENT, "layer 0 is not an MoE layer"),
        (1, [2, 9], grpc.StatusCode.FAILED_PRECONDITION, "pool pool-0 does not hold expert 9 of layer 1"),
        (1, [2, 16], grpc.StatusCode.INVALID_ARGUMENT, "pairs: expert 16 out of range [0, 16)"),
    ],
)
def test_refusals_name_the_problem(servicer, layer, experts, code, message):
    with pytest.raises(_Aborted) as exc:
        _forward(servicer, _request(layer, experts, torch.randn(2, 320)))
    assert exc.value.args[0] == code and exc.value.args[1].startswith(message), exc.value.args
    assert servicer.forward_calls == 0


def test_a_valid_request_equals_the_in_process_expert(servicer):
    hidden = torch.randn(2, 320)
    response = _forward(servicer, _request(1, [2, 5], hidden))
    got = codec.decode_partial(response, 2, 320)
    assert response.partial.dtype == wire.ELEMENT_TYPES[torch.float32]
    for row, expert in enumerate([2, 5]):
        ref = 0.5 * swiglu(hidden[row : row + 1], *servicer.store.compute_weights(1, expert))[0]
        torch.testing.assert_close(got[row], ref, rtol=1e-6, atol=1e-6)
    assert (servicer.forward_calls, servicer.routed_pairs) == (1, 2)


def test_a_pool_without_dense_copies_holds_a_fifth_of_the_bytes(tiny_fp8):
    """FP8 bytes (with their scales) only, against FP8 plus a dense fp32 copy: what the pool reports as its weight
    bytes, and the same answers."""
    pools = {}
    for dense in (False, True):
        pools[dense] = ExpertPoolServicer(
            ExpertStore(CheckpointReader(tiny_fp8), dtype=torch.float32, cache_dense=dense), f"pool-{dense}"
        )
        pools[dense].load([(1, e) for e in range(16)])
    fp8, both = pools[False].store.nbytes(), pools[True].store.nbytes()
    weights = 16 * 3 * 320 * 96
    assert weights <= fp8 < 1.1 * weights and both >= fp8 + 4 * weights  # a byte a weight; 4 more with the copies
    hidden = torch.randn(4, 320)
    answers = [codec.decode_partial(_forward(p, _request(1, [1, 4, 9, 15], hidden)), 4, 320) for p in pools.values()]
    torch.testing.assert_close(answers[0], answers[1], rtol=1e-6, atol=1e-6)
    for p in pools.values():
        p.compute.shutdown(wait=True)
