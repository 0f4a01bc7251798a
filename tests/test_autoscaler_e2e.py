"""The autoscaler in a running deployment (`expertmesh up`, real processes): automatic rebalancing of a skewed
model, and failover re-placement after a pool dies."""

from __future__ import annotations

import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from services.cli.gateway_client import GatewayClient
from services.format.checkpoint import CheckpointReader
from services.format.model_writer import write_checkpoint
from services.gateway.engine import Engine
from services.gateway.sampling import SamplingParams
from services.state.load_store import RedisLoadStore
from services.state.placement_store import RedisPlacementStore
from tests.local_deployment import UpProcess
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]
HOT = (0, 5)  # experts of groups 0 and 1 that every token will pick


@pytest.fixture(scope="module")
def skewed_model(tiny_fp8, tmp_path_factory):
    """The tiny model with a large correction bias on two experts per layer: they take every token."""
    dst = tmp_path_factory.mktemp("skewed")
    with CheckpointReader(tiny_fp8) as reader:

        def tensors():
            for name in reader.names():
                t = reader.get(name)
                if name.endswith("e_score_correction_bias"):
                    t = t.clone()
                    t[list(HOT)] += 1.0
                yield name, t

        write_checkpoint(dst, tensors())
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_fp8 / f, dst / f)
    return dst


def _load(up, prompts, tokens=12):
    client = GatewayClient(up.gateway, timeout_s=120)
    with ThreadPoolExecutor(len(prompts)) as pool:
        out = list(pool.map(lambda p: client.generate(None, p, tokens, ignore_eos=True), prompts))
    client.close()
    return out


def _counts(up, placement):
    return RedisLoadStore.from_url(up.redis, placement.layers, placement.num_experts).window(3600)


def _wait_counted(up, placement, since, pairs_per_layer, cfg):
    """The load counts once Redis holds `pairs_per_layer` more (token, expert) pairs than `since` in every layer
    that served tokens pass (not a multi-token-prediction layer, past num_hidden_layers)."""
    rows = [i for i, layer in enumerate(placement.layers) if layer < cfg.num_hidden_layers]
    seen = []

    def counted():
        seen[:] = [_counts(up, placement)]
        return bool(((seen[0] - since)[rows].sum(axis=1) >= pairs_per_layer).all())

    try:
        wait_until(counted, 30, f"{pairs_per_layer} more routed pairs per layer in Redis")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: got {(seen[0] - since)[rows].sum(axis=1).tolist()} more") from None
    return seen[0]


def _prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 1024, (16,), generator=g).tolist() for _ in range(n)]


def test_skewed_load_is_rebalanced_automatically(skewed_model, tmp_path_factory):
    """4 pools x 5 slots for 16 experts: 25% redundant slots. Balancedness under load, before and after."""
    up = UpProcess(
        skewed_model,
        pools=4,
        dispatch="fp32",
        home=tmp_path_factory.mktemp("skew"),
        autoscale=True,
        extra=[
            "--slots-per-pool",
            "5",
            "--autoscale-interval-s",
            "0.5",
            "--rebalance-min-interval-s",
            "1",
            "--load-window-s",
            "600",
            "--rebalance-threshold",
            "0.9",
        ],
    )
    try:
        store = RedisPlacementStore(up.redis)
        first = store.get()
        engine = Engine.from_dir(skewed_model, cache_tokens=4096)
        prompts = _prompts(8, 1)
        # each request: 16 prompt tokens and 11 fed back, each routed to num_experts_per_tok experts per layer
        pairs = len(prompts) * (16 + 11) * engine.cfg.num_experts_per_tok
        before_out = _load(up, prompts)
        counts_before = _wait_counted(up, first, 0, pairs, engine.cfg)
        before = first.balancedness({l: counts_before[i].tolist() for i, l in enumerate(first.layers)})
        wait_until(lambda: store.version() > first.version, 60, "the autoscaler to rebalance")
        rebalanced = up.wait_rolled_out()  # old replicas dropped after the rollout's grace
        # what the wait's one-token requests added, flushed: the next counts are those of the load alone
        up.settled_routed_pairs()
        baseline = _counts(up, rebalanced)
        after_out = _load(up, prompts)
        delta = _wait_counted(up, rebalanced, baseline, pairs, engine.cfg) - baseline
        after = rebalanced.balancedness({l: delta[i].tolist() for i, l in enumerate(rebalanced.layers)})
        print(
            f"\nskewed load: balancedness {before:.3f} before, {after:.3f} after the automatic rebalance "
            f"(placement v{first.version} -> v{rebalanced.version})"
        )
        assert before < 0.8
        assert after >= 0.9
        served = [l for l in rebalanced.layers if l < engine.cfg.num_hidden_layers]  # not an idle MTP layer
        hot_replicas = [len(rebalanced.replicas[l][e]) for l in served for e in HOT]
        assert min(hot_replicas) >= 2
        expected = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
        assert (
            [o["token_ids"] for o in after_out]
            == [o["token_ids"] for o in before_out]
            == [g.token_ids for g in expected]
        )
    finally:
        up.stop()


def test_failover_re_placement_restores_two_replicas(tiny_fp8, tmp_path_factory, engine_tiny):
    up = UpProcess(
        tiny_fp8,
        pools=3,
        dispatch="fp32",
        home=tmp_path_factory.mktemp("replace"),
        autoscale=True,
        extra=["--replicas-per-expert", "2", "--slots-per-pool", "16", "--autoscale-interval-s", "0.5"],
    )
    try:
        store = RedisPlacementStore(up.redis)
        prompts = _prompts(4, 2)
        client = GatewayClient(up.gateway, timeout_s=120)
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(client.generate, None, p, 30, ignore_eos=True) for p in prompts]
            wait_until(
                lambda: up.metric("gateway", "num_requests_running") >= len(prompts),
                60,
                "the requests to be generating",
            )
            killed = time.monotonic()
            os.kill(up.child_pid("pool-id pool-0"), signal.SIGKILL)
            results = [f.result(timeout=120) for f in futures]  # no request fails

        def re_placed():
            p = store.get()
            return "pool-0" not in p.pools and all(len(r) >= 2 for l in p.layers for r in p.replicas[l])

        wait_until(re_placed, 60, "the experts to be re-placed on the live pools with two replicas each", 0.1)
        restored = time.monotonic() - killed
        print(f"\nfailover: every expert had two replicas again {restored:.2f} s after SIGKILL")
        up.wait_rolled_out()
        again = client.generate(None, prompts[0], 8, ignore_eos=True)
        client.close()
        expected = engine_tiny.generate(prompts, SamplingParams(max_tokens=30, ignore_eos=True))
        assert [r["token_ids"] for r in results] == [g.token_ids for g in expected]
        assert again["token_ids"] == expected[0].token_ids[:8]
    finally:
        up.stop()


def test_pools_scale_with_utilisation(tiny_fp8, tmp_path_factory, engine_tiny):
    """Local actuator: sustained load above the per-pool capacity starts a pool process; idleness drains and
    stops it again."""
    up = UpProcess(
        tiny_fp8,
        pools=2,
        dispatch="fp32",
        home=tmp_path_factory.mktemp("scale"),
        autoscale=True,
        extra=[
            "--pool-capacity",
            "20",
            "--max-pools",
            "3",
            "--autoscale-interval-s",
            "0.5",
            "--load-window-s",
            "3",
            "--rebalance-threshold",
            "0",
            "--slots-per-pool",
            "16",
            "--device",
            "cpu",
        ],
    )
    try:
        store = RedisPlacementStore(up.redis)
        prompts = _prompts(4, 3)
        client = GatewayClient(up.gateway, timeout_s=120)

        def grown_under_load():
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda p: client.generate(None, p, 8, ignore_eos=True), prompts))
            placement = store.get()
            return placement if len(placement.pools) == 3 else None

        grew = wait_until(grown_under_load, 60, "a pool to be added under load", interval_s=0)
        newcomer = next(p for p in grew.pools if p not in ("pool-0", "pool-1"))
        assert _pool_argv(newcomer)[-2:] == ["--device", "cpu"]  # the autoscaler starts it on up's device
        # registered first, then a rebalance gives it experts
        wait_until(lambda: store.get().experts_on(newcomer), 30, "the new pool to get experts", 0.2)
        expected = engine_tiny.generate([prompts[0]], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
        assert client.generate(None, prompts[0], 8, ignore_eos=True)["token_ids"] == expected
        # idle: utilisation 0 once the window has passed
        wait_until(lambda: len(store.get().pools) <= 2, 60, "the idle pool to be drained", 0.5)
        up.wait_rolled_out()
        assert client.generate(None, prompts[0], 8, ignore_eos=True)["token_ids"] == expected
        client.close()
    finally:
        up.stop()


def test_replica_floor_survives_a_skewed_rebalance_and_a_pool_kill(skewed_model, tmp_path_factory):
    """`--replicas-per-expert 2` is a floor, not only the start: after the autoscaler rebalances a skewed load,
    every expert still has two replicas, so killing a pool mid-generation fails no request."""
    up = UpProcess(
        skewed_model,
        pools=3,
        dispatch="fp32",
        home=tmp_path_factory.mktemp("floor"),
        autoscale=True,
        extra=[
            "--replicas-per-expert",
            "2",
            "--slots-per-pool",
            "13",
            "--autoscale-interval-s",
            "0.5",
            "--rebalance-min-interval-s",
            "1",
            "--load-window-s",
            "600",
            "--rebalance-threshold",
            "0.95",
        ],
    )
    try:
        store = RedisPlacementStore(up.redis)
        first = store.get()
        assert first.min_replicas == 2
        engine = Engine.from_dir(skewed_model, cache_tokens=4096)
        prompts = _prompts(6, 3)
        _load(up, prompts)
        wait_until(lambda: store.version() > first.version, 90, "the autoscaler to rebalance the skewed load")
        rebalanced = up.wait_rolled_out()
        assert not rebalanced.below_floor(), f"{len(rebalanced.below_floor())} experts lost their second replica"
        assert max(len(rebalanced.replicas[l][e]) for l in rebalanced.layers for e in HOT) >= 3  # hot ones gained
        client = GatewayClient(up.gateway, timeout_s=120)
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(client.generate, None, p, 30, ignore_eos=True) for p in prompts]
            wait_until(lambda: up.metric("gateway", "num_requests_running") >= 1, 60, "requests generating")
            os.kill(up.child_pid("pool-id pool-1"), signal.SIGKILL)
            results = [f.result(timeout=120) for f in futures]  # raises if any request failed
        client.close()
        expected = engine.generate(prompts, SamplingParams(max_tokens=30, ignore_eos=True))
        assert [r["token_ids"] for r in results] == [g.token_ids for g in expected]
    finally:
        up.stop()


def _pool_argv(pool_id: str) -> list[str]:
    """The command line of the running pool process with this id."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode().split("\0")[:-1]
        except OSError:  # gone meanwhile
            continue
        if "services.expert.server" in argv and pool_id in argv:
            return argv
    raise AssertionError(f"no process of {pool_id}")
