"""The autoscaler's pool-scaling decision (utilisation over a window, patience, bounds), on a real Redis.

The actuator here only records what it is asked: the real ones are tested in test_kubernetes_actuator.py
(Kubernetes, via kmock) and this test is about when the autoscaler asks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from services.autoscaler.service import Autoscaler, AutoscalerConfig
from services.format.config import ModelConfig
from services.state.load_store import RedisLoadStore
from services.state.placement import Placement, Pool
from services.state.placement_store import RedisPlacementStore

pytestmark = pytest.mark.slow  # a real redis-server


class RecordingActuator:
    def __init__(self):
        self.calls = []

    def scale_up(self, n):
        self.calls.append(("up", n))

    def scale_down(self, n):
        self.calls.append(("down", n))


def test_sustained_utilisation_scales_up_and_idle_scales_down(redis_server, tiny_fp8):
    cfg = ModelConfig.from_file(tiny_fp8)
    RedisPlacementStore(redis_server.url).publish(
        Placement.spread(cfg, [Pool("pool-0", "127.0.0.1:1"), Pool("pool-1", "127.0.0.1:2")])
    )
    actuator = RecordingActuator()
    config = AutoscalerConfig(load_window_s=10, pool_capacity=100, scale_patience=2, min_pools=1, max_pools=3)
    scaler = Autoscaler(redis_server.url, config, actuator=actuator)
    placement = RedisPlacementStore(redis_server.url).get()
    busy = np.full((len(cfg.moe_layers), cfg.n_routed_experts), 200)  # 3200 tokens/layer in 10 s: 160/s per pool
    assert scaler._scale(placement, busy) is False  # one tick is not enough
    assert scaler._scale(placement, busy) is True
    assert actuator.calls == [("up", 3)]
    idle = np.zeros_like(busy)
    assert scaler._scale(placement, idle) is False
    assert scaler._scale(placement, idle) is True
    assert actuator.calls[-1] == ("down", 1)
    normal = np.full_like(busy, 60)  # 960 / 10 s / 2 pools / 100 = 0.48: in band
    for _ in range(5):
        assert scaler._scale(placement, normal) is False
    single = Placement.spread(cfg, [Pool("pool-0", "127.0.0.1:1")])
    for _ in range(3):
        scaler._scale(single, idle)
    assert actuator.calls[-1] == ("down", 1)  # never below min_pools: no ("down", 0)


def test_rebalance_needs_enough_tokens(redis_server, tiny_fp8, monkeypatch):
    cfg = ModelConfig.from_file(tiny_fp8)
    store = RedisPlacementStore(redis_server.url)
    store.publish(Placement.spread(cfg, [Pool("pool-0", "127.0.0.1:1"), Pool("pool-1", "127.0.0.1:2")]))
    counts = np.zeros((len(cfg.moe_layers), cfg.n_routed_experts), np.int64)
    counts[:, 0] = 10  # skewed, but only 20 tokens
    RedisLoadStore.from_url(redis_server.url, cfg.moe_layers, cfg.n_routed_experts).write(
        {int(time.time() // 5): counts}
    )
    import services.autoscaler.service as service

    monkeypatch.setattr(service, "is_serving", lambda address, timeout_s=1.0: True)  # these pools are addresses only
    scaler = Autoscaler(redis_server.url, AutoscalerConfig(load_window_s=60, min_tokens=1000))
    assert scaler.tick() is None and store.version() == 1  # skewed, but too few tokens to act on
    assert scaler.last_balancedness is not None and scaler.last_balancedness < 0.85


def test_phase_3_unloads_only_what_the_current_placement_does_not_want_and_only_while_leading(tiny_fp8):
    """A deposed leader's delayed unload must not take replicas away that a newer placement (another leader's,
    or a later rollout) put back on the pool, nor unload anything once it no longer leads."""
    from services.autoscaler.rollout import still_unwanted

    cfg = ModelConfig.from_file(tiny_fp8)
    pools = [Pool("pool-0", "a"), Pool("pool-1", "b")]
    current = Placement.spread(cfg, pools, replicas=2)  # every expert on both pools again
    losses = {"pool-0": {(1, 3), (1, 4)}, "pool-1": {(2, 5)}, "gone": {(1, 1)}}
    assert still_unwanted(current, losses, leading=True) == {"pool-0": set(), "pool-1": set(), "gone": {(1, 1)}}
    narrow = Placement.spread(cfg, pools)  # expert 3 of layer 1 lives on one pool only now
    kept = still_unwanted(narrow, losses, leading=True)
    for pool in ("pool-0", "pool-1"):
        assert kept[pool] == losses[pool] - set(narrow.experts_on(pool))
    assert kept["pool-0"] == {(1, 3), (1, 4)} - set(narrow.experts_on("pool-0")) != losses["pool-0"]
    assert kept["pool-0"] and kept["gone"] == {(1, 1)}
    assert still_unwanted(current, losses, leading=False) == {}
