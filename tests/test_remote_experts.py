"""Routing decisions of the remote-experts client (no servers needed: channels connect lazily)."""

from __future__ import annotations

import time

import pytest
import torch

from services.format.config import ModelConfig
from services.errors import PoolUnavailableError
from services.state.placement import Placement, Pool
from services.gateway.remote_experts import RemoteExperts


@pytest.fixture
def remote(tiny_fp8):
    cfg = ModelConfig.from_file(tiny_fp8)
    pools = [Pool(f"pool-{i}", f"127.0.0.1:{1 + i}") for i in range(3)]
    r = RemoteExperts(Placement.spread(cfg, pools, replicas=2), cfg.n_routed_experts, "fp32")
    yield r
    r.close()


def test_tokens_are_dealt_over_replicas_by_count(remote):
    experts = torch.tensor([5] * 10 + [6] * 3)
    pools = remote._assign(1, experts)
    expect5 = remote.replicas[1][5].tolist()
    assert sorted(pools[:10].tolist()) == sorted(expect5 * 5)  # 5 tokens to each replica
    assert set(pools[10:].tolist()) <= set(remote.replicas[1][6].tolist())


def test_dead_pools_are_routed_around_until_none_is_left(remote):
    experts = torch.arange(16)
    victim = remote.pool_ids.index("pool-1")
    remote._mark_dead("pool-1", "test")
    assert victim not in remote._assign(1, experts).tolist()
    remote._mark_dead("pool-0", "test")
    with pytest.raises(PoolUnavailableError, match="no live replica"):
        remote._assign(1, experts)  # some expert lives only on pools 0 and 1
    remote.dead_for_s = 0.0
    remote._dead_until = {p: time.monotonic() - 1 for p in remote._dead_until}
    assert set(remote._assign(1, experts).tolist()) == {0, 1, 2}  # back after the dead period


def test_excluded_pools_are_skipped_for_one_call_only(remote):
    experts = torch.arange(16)
    holder = remote.pool_ids.index("pool-1")
    assert holder not in remote._assign(1, experts, exclude={holder}).tolist()
    assert holder in remote._assign(1, experts).tolist()  # not marked dead
