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


@pytest.fixture
def servicer(tiny_fp8):
    store = ExpertStore(CheckpointReader(tiny_fp8), dtype=torch.float32, cache_dense=True)
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
