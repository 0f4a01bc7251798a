"""The remote-experts client: routing decisions (no servers needed: channels connect lazily), and the whole
dispatch through in-process pool servicers."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future

import grpc
import pytest
import torch

from expertmesh.v1 import expert_pool_pb2
from services.errors import PoolUnavailableError
from services.expert.local import LocalExperts
from services.expert.server import ExpertPoolServicer
from services.expert.store import ExpertStore
from services.format.checkpoint import CheckpointReader
from services.format.config import ModelConfig
from services.gateway.remote_experts import RemoteExperts
from services.state.placement import Placement, Pool


@pytest.fixture(params=["stream", "unary"])
def remote(tiny_fp8, request):
    cfg = ModelConfig.from_file(tiny_fp8)
    pools = [Pool(f"pool-{i}", f"127.0.0.1:{1 + i}") for i in range(3)]
    r = RemoteExperts(Placement.spread(cfg, pools, replicas=2), "fp32", transport=request.param)
    yield r
    r.close()


def assign(remote, experts: torch.Tensor, exclude: set[int] = frozenset()) -> torch.Tensor:
    """Layer 1's pools for `experts` [P], as if each pair were a token of its own."""
    return remote._assign(1, experts, experts.numel(), exclude)


def test_tokens_are_dealt_over_replicas_by_count(remote):
    experts = torch.tensor([5] * 10 + [6] * 3)
    pools = assign(remote, experts)
    expect5 = remote.replicas[1][5].tolist()
    assert sorted(pools[:10].tolist()) == sorted(expect5 * 5)  # 5 tokens to each replica
    assert set(pools[10:].tolist()) <= set(remote.replicas[1][6].tolist())


def three_replicas(remote, tiny_fp8, shares: list[float]) -> None:
    """Every expert on all 3 pools; layer 1 expert 5 split by `shares` (in pool order)."""
    cfg = ModelConfig.from_file(tiny_fp8)
    placement = Placement.spread(cfg, [Pool(f"pool-{i}", f"127.0.0.1:{1 + i}") for i in range(3)], replicas=3)
    placement.replicas[1][5] = ["pool-0", "pool-1", "pool-2"]
    placement.shares = {1: {5: shares}}
    remote.set_placement(placement)


def test_pairs_are_dealt_in_proportion_to_the_shares(remote, tiny_fp8):
    three_replicas(remote, tiny_fp8, [0.25, 0.75, 0.0])
    pools = assign(remote, torch.tensor([5] * 400 + [6] * 30))  # [430]
    assert torch.bincount(pools[:400], minlength=3).tolist() == [100, 300, 0]
    assert torch.bincount(pools[400:], minlength=3).tolist() == [10, 10, 10]  # even shares: balanced counts
    three_replicas(remote, tiny_fp8, [0.2, 0.3, 0.5])
    assert torch.bincount(assign(remote, torch.tensor([5] * 7)), minlength=3).tolist() == [1, 2, 4]


def test_a_dead_replicas_share_goes_to_the_live_ones_in_proportion(remote, tiny_fp8):
    three_replicas(remote, tiny_fp8, [0.2, 0.3, 0.5])
    remote._mark_dead("pool-0", "test")
    assert torch.bincount(assign(remote, torch.tensor([5] * 800)), minlength=3).tolist() == [0, 300, 500]
    remote._dead_until = {}
    three_replicas(remote, tiny_fp8, [0.0, 1.0, 0.0])  # the only replica with a share is dead: the rest, evenly
    remote._mark_dead("pool-1", "test")
    assert torch.bincount(assign(remote, torch.tensor([5] * 10)), minlength=3).tolist() == [5, 0, 5]


def test_dead_pools_are_routed_around_until_none_is_left(remote):
    experts = torch.arange(16)
    victim = remote.pool_ids.index("pool-1")
    remote._mark_dead("pool-1", "test")
    assert victim not in assign(remote, experts).tolist()
    remote._mark_dead("pool-0", "test")
    with pytest.raises(PoolUnavailableError, match="no live replica"):
        assign(remote, experts)  # some expert lives only on pools 0 and 1
    remote.dead_for_s = 0.0
    remote._dead_until = {p: time.monotonic() - 1 for p in remote._dead_until}
    assert set(assign(remote, experts).tolist()) == {0, 1, 2}  # back after the dead period


def test_excluded_pools_are_skipped_for_one_call_only(remote):
    experts = torch.arange(16)
    holder = remote.pool_ids.index("pool-1")
    assert holder not in assign(remote, experts, exclude={holder}).tolist()
    assert holder in assign(remote, experts).tolist()  # not marked dead


def test_a_small_layer_goes_to_the_fewest_pools_in_turn(remote, tiny_fp8):
    """At most fewest_pools_max_tokens tokens: one pool where one holds every expert of the layer, the pools
    taking turns; a greedy cover where none does; dealt by shares above the limit."""
    cfg = ModelConfig.from_file(tiny_fp8)
    placement = Placement.spread(cfg, [Pool(f"pool-{i}", f"127.0.0.1:{1 + i}") for i in range(3)], replicas=3)
    remote.set_placement(placement)  # every expert on all 3 pools
    remote.fewest_pools_max_tokens = 2
    experts = torch.tensor([1, 4, 9, 12])  # 2 tokens of top-2
    picked = [remote._assign(1, experts, 2).unique().tolist() for _ in range(6)]
    assert all(len(p) == 1 for p in picked)
    assert sorted(p[0] for p in picked) == [0, 0, 1, 1, 2, 2]  # each pool in turn
    assert len(remote._assign(1, experts, 3).unique()) > 1  # 3 tokens: dealt over the replicas again
    placement.replicas[1][1] = ["pool-0"]
    placement.replicas[1][4] = ["pool-1", "pool-2"]
    placement.replicas[1][9] = ["pool-1", "pool-2"]
    placement.replicas[1][12] = ["pool-0", "pool-1"]
    remote.set_placement(placement)
    pools = remote._assign(1, experts, 2).tolist()
    assert pools == [0, 1, 1, 1]  # pool-1 holds three of the four, expert 1 only pool-0
    remote._mark_dead("pool-1", "test")
    assert remote._assign(1, experts, 2).tolist() == [0, 2, 2, 0]  # two pools still, of the live ones


class _Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection refused"


class _Context:
    async def abort(self, code, details):
        raise AssertionError(f"{code}: {details}")


def _in_process_pools(remote, tiny_fp8, failing: set[str] = frozenset()):
    """Each pool's Forward answered by a real pool servicer in this process (the bytes the gateway serialized,
    decoded by the pool's codec), or failing like a dead pool."""
    placement = remote.placement
    servicers = []
    for pool_id in placement.pools:
        store = ExpertStore(CheckpointReader(tiny_fp8), dtype=torch.float32, cache_dense=True)
        servicer = ExpertPoolServicer(store, pool_id)
        servicer.load(placement.experts_on(pool_id))
        servicers.append(servicer)

        def forward(data, timeout=None, _s=servicer, _id=pool_id):
            if _id in failing:
                raise _Unavailable()
            request = expert_pool_pb2.ForwardRequest.FromString(data)
            return asyncio.run(_s.Forward(request, _Context()))

        remote._forward[pool_id] = forward
        remote._streams[pool_id] = _StreamOf(forward)
    return servicers


class _StreamOf:
    """A pool stream answered by `forward` (the unary form) in this process, as a PoolStream's Future."""

    def __init__(self, forward):
        self.forward = forward

    def send(self, message):
        data = message.request.SerializeToString()
        future = Future()
        try:
            future.set_result(self.forward(data))
        except grpc.RpcError as exc:
            future.set_exception(exc)
        return future, len(data)

    def close(self):
        pass


@pytest.mark.parametrize("tokens", [12, 3])
@pytest.mark.parametrize("failing", [set(), {"pool-1"}])
def test_fp32_dispatch_equals_in_process_experts(remote, tiny_fp8, failing, tokens):
    """Pool shares encoded, decoded by the pools, computed and summed back equal the in-process experts (fp32
    dispatch), also when a pool fails and its pairs go to the other replicas; 3 tokens go to the fewest pools."""
    servicers = _in_process_pools(remote, tiny_fp8, failing)
    local = LocalExperts.load_all(ExpertStore(CheckpointReader(tiny_fp8), dtype=torch.float32, cache_dense=True))
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(tokens, 320, generator=g)  # [T, H]
    topk_idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(tokens)])  # [T, K]
    topk_w = torch.rand(tokens, 4, generator=g)  # [T, K]
    got = remote.start(1, hidden, topk_idx, topk_w)()
    torch.testing.assert_close(got, local.start(1, hidden, topk_idx, topk_w)(), rtol=1e-5, atol=1e-5)
    asked = [s for s in servicers if s.routed_pairs]
    if tokens <= remote.fewest_pools_max_tokens and not failing:  # 2 replicas over 3 pools: 2 cover any 12 experts
        assert len(asked) <= 2
    if tokens > remote.fewest_pools_max_tokens:
        assert remote.failovers == (1 if failing else 0)  # pool-1 holds some of any 12 tokens' experts
    else:
        assert remote.failovers <= (1 if failing else 0)  # once, if pool-1 was among the fewest
    assert sum(s.routed_pairs for s in servicers) == tokens * 4  # every pair computed once, by a live pool
    for s in servicers:
        s.compute.shutdown(wait=True)
