"""Where a pool computes a batch: decode-sized batches on its event loop, large ones on its compute thread, and
every batch on the compute thread (after the change) while a load or unload is changing the store.

The real servicer on the tiny FP8 checkpoint, called directly (no network); the compute function is wrapped
only to record the thread it ran on, and its result is checked against the in-process engine's experts.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from expertmesh.v1 import expert_pool_pb2
from services.dispatch import codec, wire
from services.expert import server as pool_server
from services.expert.store import ExpertStore
from services.format.checkpoint import CheckpointReader
from services.math.routed_pairs import RoutedPairs

LAYER = 1


class _Context:
    async def abort(self, code, details):
        raise AssertionError(f"{code}: {details}")


def _request(n_tokens: int, experts: list[int]) -> expert_pool_pb2.ForwardRequest:
    g = torch.Generator().manual_seed(n_tokens)
    hidden = torch.randn(n_tokens, 320, generator=g)
    topk = torch.tensor(experts).repeat(n_tokens, 1)  # [T, K]
    pairs = RoutedPairs.from_topk(topk, torch.full(topk.shape, 0.5))
    return codec.encode_request(LAYER, codec.DispatchRows(hidden, "fp32"), pairs)[1]


@pytest.fixture
def servicer(tiny_fp8, monkeypatch):
    threads: list[str] = []
    compute = pool_server.grouped_pairs_forward

    def recording(*args):
        threads.append(threading.current_thread().name)
        return compute(*args)

    monkeypatch.setattr(pool_server, "grouped_pairs_forward", recording)
    store = ExpertStore(CheckpointReader(tiny_fp8), dtype=torch.float32, cache_dense=True)
    s = pool_server.ExpertPoolServicer(store, "pool-0")
    s.load([(LAYER, e) for e in range(8)])
    s.threads = threads
    yield s
    s.compute.shutdown(wait=True)


def _expected(servicer, request) -> torch.Tensor:
    from services.math.layers import swiglu

    hidden = wire.decode(request.hidden, "hidden")
    out = torch.zeros_like(hidden)
    pairs = wire.decode(request.pairs, "pairs").tolist()  # [P, 2]
    for (t, e), w in zip(pairs, wire.decode(request.pair_weights, "pair_weights").tolist()):
        out[t] += w * swiglu(hidden[t : t + 1], *servicer.store.compute_weights(LAYER, e))[0]
    return out


def test_small_batches_on_the_loop_large_ones_on_the_compute_thread(servicer):
    small = _request(4, [0, 3])  # 8 pairs
    large = _request(pool_server.INLINE_MAX_PAIRS, [1, 2])  # twice the inline limit

    async def run():
        loop_thread = threading.current_thread().name
        a = await servicer.Forward(small, _Context())
        b = await servicer.Forward(large, _Context())
        return loop_thread, a, b

    loop_thread, a, b = asyncio.run(run())
    assert servicer.threads == [loop_thread, "expert-compute_0"]
    torch.testing.assert_close(wire.decode(a.partial, "partial"), _expected(servicer, small), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wire.decode(b.partial, "partial"), _expected(servicer, large), rtol=1e-5, atol=1e-5)


def test_a_batch_waits_for_a_store_change_in_progress(servicer):
    small = _request(2, [0])
    order: list[str] = []
    release = threading.Event()

    def slow_change():
        release.wait(10)
        servicer.store.load(LAYER, 9)
        order.append("change")

    async def run():
        change = asyncio.ensure_future(servicer.change_store(slow_change))
        await asyncio.sleep(0.05)  # the change is running on the compute thread
        forward = asyncio.ensure_future(servicer.Forward(small, _Context()))
        await asyncio.sleep(0.05)
        assert not forward.done()  # queued behind the change, not computed beside it
        release.set()
        await change
        response = await forward
        order.append("forward")
        return response

    response = asyncio.run(run())
    assert order == ["change", "forward"]
    assert servicer.threads == ["expert-compute_0"]
    torch.testing.assert_close(
        wire.decode(response.partial, "partial"), _expected(servicer, small), rtol=1e-5, atol=1e-5
    )
