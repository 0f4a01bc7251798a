"""Per-expert load in Redis (a real redis-server): bucketed counts, the gateway's non-blocking recorder with
its outage buffer, and `expertmesh load top`."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis
import torch
from typer.testing import CliRunner

from services.cli.app import app
from services.format.config import ModelConfig
from services.state.load_store import LoadRecorder, RedisLoadStore
from services.state.placement import Placement, Pool
from services.state.placement_store import RedisPlacementStore
from tests.conftest import RedisServer

LAYERS, E = [1, 2], 16


@pytest.mark.slow  # a real redis-server
def test_buckets_sum_over_the_window_and_expire(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    store = RedisLoadStore(client, LAYERS, E, bucket_s=5)
    now = time.time()
    a, b = np.zeros((2, E), np.int64), np.zeros((2, E), np.int64)
    a[0, 3], a[1, 7], b[0, 3] = 10, 4, 5
    store.write({int(now // 5): a, int(now // 5) - 1: b, int(now // 5) - 100: a * 1000})
    window = store.window(12, now)
    assert window[0, 3] == 15 and window[1, 7] == 4 and window.sum() == 19  # the old bucket is outside
    assert 0 < client.ttl(f"expertmesh:load:1:{int(now // 5)}") <= 3600


@pytest.mark.slow  # a real redis-server
def test_recorder_counts_routed_tokens_in_one_round_trip_per_flush(redis_server):
    store = RedisLoadStore.from_url(redis_server.url, LAYERS, E)
    recorder = LoadRecorder(store)
    idx = torch.tensor([[3, 7], [3, 9], [1, 3]])
    recorder.observe(1, idx)
    recorder.observe(2, idx[:1])
    assert recorder.flush()
    window = store.window(60)
    assert window[0].tolist() == np.bincount([3, 7, 3, 9, 1, 3], minlength=E).tolist()
    assert window[1, 3] == 1 and window[1, 7] == 1 and window.sum() == 8


@pytest.mark.slow  # a real redis-server
def test_recorder_buffers_through_an_outage_and_flushes_on_reconnect(redis_server):
    port = redis_server.port
    store = RedisLoadStore.from_url(redis_server.url, LAYERS, E)
    recorder = LoadRecorder(store)
    recorder.observe(1, torch.tensor([[2, 5]]))
    redis_server.stop()
    started = time.monotonic()
    recorder.observe(1, torch.tensor([[2, 6]]))  # inference goes on: observe never touches the network
    assert not recorder.flush()
    assert time.monotonic() - started < 5  # a bounded wait, not a stall
    assert recorder.outage_since is not None and recorder.buffered_buckets >= 1
    restarted = RedisServer(port)
    try:
        assert recorder.flush()
        assert recorder.outage_since is None
        window = RedisLoadStore.from_url(restarted.url, LAYERS, E).window(60)
        assert window[0, 2] == 2 and window[0, 5] == 1 and window[0, 6] == 1  # nothing lost
    finally:
        restarted.stop()
        redis_server.proc = restarted.proc  # the fixture's stop() has a process to stop


def test_recorder_buffer_is_bounded(monkeypatch):
    import services.state.load_store as load_store

    store = RedisLoadStore.from_url("redis://127.0.0.1:1/0", LAYERS, E)  # nothing listens there
    recorder = LoadRecorder(store, max_buckets=3)
    clock = iter(range(0, 600, 5))  # each observation lands in the next 5 s bucket
    monkeypatch.setattr(load_store.time, "time", lambda: float(next(clock)))
    for _ in range(6):
        recorder.observe(1, torch.tensor([[1, 2]]))
    assert not recorder.flush()
    assert recorder.buffered_buckets == 3 and recorder.dropped_buckets == 3


@pytest.mark.slow  # a real redis-server
def test_load_top_json(redis_server, tiny_fp8):
    cfg = ModelConfig.from_file(tiny_fp8)
    placement = Placement.spread(cfg, [Pool("pool-0", "a:1"), Pool("pool-1", "b:2")])
    placement.replicas[1][3] = ["pool-0", "pool-1"]  # expert 3 of layer 1 has two replicas
    RedisPlacementStore(redis_server.url).publish(placement)
    store = RedisLoadStore.from_url(redis_server.url, cfg.moe_layers, cfg.n_routed_experts)
    counts = np.zeros((len(cfg.moe_layers), cfg.n_routed_experts), np.int64)
    counts[0, 3], counts[0, 4], counts[1, 0] = 100, 30, 10
    store.write({int(time.time() // 5): counts})
    result = CliRunner().invoke(app, ["load", "top", "--redis", redis_server.url, "--window", "30", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["window_s"] == 30.0
    assert out["experts"][0] == {"layer": 1, "expert": 3, "tokens": 100, "replicas": 2}
    pools = {p["pool"]: p["tokens"] for p in out["pools"]}
    assert sum(pools.values()) == 140
    # layer 1: expert 3 split 50/50, expert 4 on pool-(4+1)%2 = pool-1 -> 50 / 80; layer 2: expert 0 -> pool 0
    assert pools == {"pool-0": 60, "pool-1": 80}
    assert abs(out["balancedness"] - np.mean([65 / 80, 5 / 10])) < 1e-6


@pytest.mark.slow  # a real redis-server
def test_load_top_errors(redis_server):
    result = CliRunner().invoke(app, ["load", "top", "--redis", redis_server.url])
    assert result.exit_code == 2 and "no placement" in result.output
