"""The placement planner (EPLB-style replication and packing) and `expertmesh placement plan`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from services.autoscaler.planner import moves, plan, plan_layer, replica_counts
from services.cli.app import app
from services.errors import InvalidRequestError


def zipf_load(layers, experts, seed=0, s=1.0):
    rng = np.random.default_rng(seed)
    base = 1e5 / np.arange(1, experts + 1) ** s
    return np.stack([rng.permutation(base) for _ in range(layers)])


def check_valid(layer_plan, experts, slots):
    held = [e for pool in layer_plan.pools for e in pool]
    assert set(held) == set(range(experts))  # every logical expert keeps a replica
    assert all(len(pool) <= slots for pool in layer_plan.pools)  # budgets hold
    assert all(len(pool) == len(set(pool)) for pool in layer_plan.pools)  # no pool holds two of one expert


def test_replicas_go_to_the_highest_load_per_replica():
    counts = replica_counts(np.array([100.0, 10.0, 50.0, 1.0]), slots=7, max_per_expert=4)
    assert counts.tolist() == [3, 1, 2, 1]  # 100/3 = 33 vs 50/2 = 25: the next one would go to expert 0
    assert replica_counts(np.array([100.0, 1.0]), slots=10, max_per_expert=3).tolist() == [3, 3]


@pytest.mark.parametrize("pools,slots", [(8, 5), (16, 3), (32, 1)])
def test_plan_is_valid_and_balances_skewed_load(pools, slots):
    load = zipf_load(4, 32)
    for i, lp in enumerate(plan(load, pools, slots)):
        check_valid(lp, 32, slots)
        naive = np.zeros(pools)
        for e in range(32):
            naive[e % pools] += load[i, e]
        assert lp.balancedness >= naive.mean() / naive.max()
        assert sum(lp.pool_load) == pytest.approx(load[i].sum())


def test_25_percent_redundancy_reaches_high_balancedness():
    load = zipf_load(6, 64, s=0.8)
    layers = plan(load, num_pools=16, slots_per_pool=5)  # 80 slots for 64 experts: 25% redundant
    assert min(lp.balancedness for lp in layers) >= 0.9


def test_replanning_the_same_load_moves_nothing_and_small_drift_moves_little():
    load = zipf_load(3, 64, seed=1)
    first = plan(load, 16, 5)
    again = plan(load, 16, 5, current=[lp.pools for lp in first])
    assert sum(moves(a.pools, b.pools) for a, b in zip(first, again)) == 0
    drift = load * np.random.default_rng(2).uniform(0.95, 1.05, load.shape)
    later = plan(drift, 16, 5, current=[lp.pools for lp in first])
    moved = sum(moves(a.pools, b.pools) for a, b in zip(first, later))
    fresh = sum(moves(a.pools, b.pools) for a, b in zip(first, plan(drift, 16, 5)))
    assert moved < fresh and moved <= 0.25 * 3 * 80


def test_pinned_replicas_stay():
    load = zipf_load(1, 16)[0]
    hottest = int(np.argmax(load))
    lp = plan_layer(load, 4, 5, pinned={(hottest, 3), (0, 3)})
    assert hottest in lp.pools[3] and 0 in lp.pools[3]


def test_impossible_budgets_are_refused():
    with pytest.raises(InvalidRequestError, match="cannot hold"):
        plan(zipf_load(1, 16), 3, 5)
    with pytest.raises(InvalidRequestError, match="non-negative"):
        plan(-zipf_load(1, 16), 4, 5)


def test_placement_plan_cli_json(tmp_path):
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"load": zipf_load(3, 16).tolist()}))
    args = ["placement", "plan", "--load", str(path), "--pools", "4", "--slots-per-pool", "5", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["seconds"] >= 0 and len(out["layers"]) == 3
    assert all(len(layer["pools"]) == 4 for layer in out["layers"])
    assert sorted({e for pool in out["layers"][0]["pools"] for e in pool}) == list(range(16))
    shares = out["layers"][0]["shares"]  # expert -> share per replica, replicas in pool order
    assert [len(s) for s in shares] == [sum(e in pool for pool in out["layers"][0]["pools"]) for e in range(16)]
    assert all(sum(s) == pytest.approx(1.0) for s in shares)


@pytest.mark.parametrize(
    "content,args,message",
    [
        (None, ["--pools", "4", "--slots-per-pool", "5"], "no load file"),
        ("{not json", ["--pools", "4", "--slots-per-pool", "5"], "not valid JSON"),
        ('{"load": [[1, 2, 3, 4]]}', ["--pools", "1", "--slots-per-pool", "2"], "cannot hold"),
    ],
)
def test_placement_plan_cli_errors(tmp_path, content, args, message):
    path = tmp_path / "load.json"
    if content is not None:
        path.write_text(content)
    result = CliRunner().invoke(app, ["placement", "plan", "--load", str(path), *args])
    assert result.exit_code == 2 and message in result.output


def test_tight_budgets_with_many_replicas_still_pack():
    """Every slot used and hot experts on every pool: greedy packing alone can corner itself."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        load = rng.permutation(np.array([1000.0, 900.0] + [1.0] * 14))
        lp = plan_layer(load, 3, 8)  # 24 slots for 16 experts
        check_valid(lp, 16, 8)
        assert sum(len(p) for p in lp.pools) == 24


def test_replica_floor_is_kept_where_slots_allow_and_hottest_first_where_not():
    load = np.array([100, 1, 1, 1, 50, 1, 1, 1.0])
    assert replica_counts(load, 16, 3, min_per_expert=2).tolist() == [2] * 8
    assert replica_counts(load, 12, 3, min_per_expert=2).tolist() == [2, 2, 2, 1, 2, 1, 1, 1]  # 4 spare slots
    counts = replica_counts(load, 20, 3, min_per_expert=2)
    assert counts.min() == 2 and counts.sum() == 20 and counts[0] == counts[4] == 3
    skewed = np.stack([load, load[::-1]])
    for layer in plan(skewed, 4, 4, min_replicas=2):  # a skewed load would leave cold experts single
        held = [sum(e in pool for pool in layer.pools) for e in range(8)]
        assert min(held) == 2
    for layer in plan(skewed, 4, 4):
        assert min(sum(e in pool for pool in layer.pools) for e in range(8)) == 1  # without the floor it does


def eplb_greedy(load, pools, slots):
    """DeepSeek EPLB's greedy, as a reference: each redundant slot to the expert with the highest load per replica,
    then replicas heaviest first onto the least loaded pool with a slot left. -> (balancedness, whether some pool
    got two replicas of one expert, which EPLB allows and the planner does not)."""
    counts = np.ones(load.shape[0], dtype=np.int64)
    for _ in range(pools * slots - load.shape[0]):
        counts[int(np.argmax(load / counts))] += 1
    weight, expert = np.repeat(load / counts, counts), np.repeat(np.arange(load.shape[0]), counts)
    pool_load, used, held = np.zeros(pools), np.zeros(pools, dtype=np.int64), [set() for _ in range(pools)]
    doubled = False
    for i in np.argsort(-weight, kind="stable"):
        pool = int(np.argmin(np.where(used < slots, pool_load, np.inf)))
        doubled |= int(expert[i]) in held[pool]
        held[pool].add(int(expert[i]))
        pool_load[pool] += weight[i]
        used[pool] += 1
    return pool_load.mean() / pool_load.max(), doubled


def test_balances_at_least_as_well_as_eplb_greedy_on_random_zipf_loads():
    """64 experts, 2 to 6 slots per pool, Zipf 0.6-1.4 with noise. Where EPLB's greedy keeps one replica of an expert
    per pool, the planner starts from the same packing and only lowers its maximum; where the greedy doubles up it
    solves an easier problem, yet on average the planner still balances better."""
    shapes = [(18, 4), (16, 5), (24, 3), (13, 6), (40, 2)]
    ours, theirs = [], []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        pools, slots = shapes[seed % len(shapes)]
        load = rng.permutation(1e4 / np.arange(1, 65) ** rng.uniform(0.6, 1.4)) * rng.uniform(0.9, 1.1, 64)
        lp = plan_layer(load, pools, slots)
        check_valid(lp, 64, slots)
        greedy, doubled = eplb_greedy(load, pools, slots)
        if not doubled:
            assert lp.balancedness >= greedy - 1e-9, (seed, lp.balancedness, greedy)
        ours.append(lp.balancedness)
        theirs.append(greedy)
    assert np.mean(ours) > np.mean(theirs) + 0.005
    assert sum(o > t + 0.01 for o, t in zip(ours, theirs)) >= 5  # the local search matters, not just ties


def test_local_search_reaches_the_bound_where_the_slots_allow():
    layers = plan(zipf_load(6, 64, s=1.0), 16, 5)  # 25% redundant: max(mean, heaviest replica) is the mean
    assert min(lp.balancedness for lp in layers) >= 0.99


def held_counts(layer_plan, experts):
    return np.bincount([e for pool in layer_plan.pools for e in pool], minlength=experts)


def test_constraints_hold_with_pins_floor_and_a_current_placement():
    rng = np.random.default_rng(3)
    for seed in range(6):
        load = zipf_load(1, 64, seed=seed, s=1.2)[0]
        pinned = {(int(e), int(p)) for e, p in zip(rng.choice(64, 8, replace=False), rng.integers(0, 18, 8))}
        first = plan_layer(load, 18, 8, pinned=pinned, min_replicas=2)  # 144 slots: the floor needs 128
        drift = load * rng.uniform(0.7, 1.3, 64)
        for lp in (first, plan_layer(drift, 18, 8, current=first.pools, pinned=pinned, min_replicas=2)):
            check_valid(lp, 64, 8)
            assert all((e, p) in {(e, p) for p, pool in enumerate(lp.pools) for e in pool} for e, p in pinned)
            assert held_counts(lp, 64).min() >= 2  # the floor
            assert sum(len(pool) for pool in lp.pools) == 144  # every slot used


def test_plans_are_deterministic():
    load = zipf_load(4, 64, seed=7, s=1.1)
    drift = load * np.random.default_rng(8).uniform(0.9, 1.1, load.shape)
    pinned = {(0, 5, 3), (2, 9, 0)}
    first = plan(load, 18, 4, pinned=pinned, min_replicas=1)
    current = [lp.pools for lp in first]
    runs = [plan(drift, 18, 4, current=current, pinned=pinned) for _ in range(2)]
    assert [lp.pools for lp in runs[0]] == [lp.pools for lp in runs[1]]
    assert [lp.pool_load for lp in runs[0]] == [lp.pool_load for lp in runs[1]]
    assert [lp.pools for lp in first] == [lp.pools for lp in plan(load, 18, 4, pinned=pinned)]


def test_small_drift_moves_almost_nothing_when_the_heaviest_replica_sets_the_bound():
    """18 x 4 slots for 64 experts at Zipf 1.1: the heaviest replica is above the mean pool load, and each pool fills
    its 4 slots, so no plan reaches max(mean, heaviest); replicas stay put while within slack of what a fresh plan
    reaches (not of that bound, which would unseat replicas that no plan could place better)."""
    for seed in range(3):
        load = zipf_load(6, 64, seed=seed, s=1.1)
        first = plan(load, 18, 4)
        drift = load * np.random.default_rng(seed + 10).uniform(0.95, 1.05, load.shape)
        later = plan(drift, 18, 4, current=[lp.pools for lp in first])
        assert sum(moves(a.pools, b.pools) for a, b in zip(first, later)) <= 4  # of 432 replicas
        fresh = plan(drift, 18, 4)
        assert np.mean([lp.balancedness for lp in later]) >= np.mean([lp.balancedness for lp in fresh]) - 0.025


def test_no_plan_beats_the_any_plan_bound_and_the_planner_meets_it_at_v3_scale():
    """benchmarks/bench_planner.py's bound over every plan (any shares, empty slots, any sharing of pools) is
    what BENCHMARKS.md's "the planner is optimal there" rests on: it is never below a balancedness the planner
    reaches (60 random layers, 1 to 6 slots a pool, shares included), and at DeepSeek-V3 scale (72 pools x 4 slots,
    Zipf 1.1) the planner reaches it."""
    from benchmarks.bench_planner import any_plan_bound, zipf

    shapes = [(18, 4), (16, 5), (24, 3), (13, 6), (40, 2), (70, 1)]
    tight = 0
    for seed in range(60):
        rng = np.random.default_rng(100 + seed)
        pools, slots = shapes[seed % len(shapes)]
        load = rng.permutation(1e4 / np.arange(1, 65) ** rng.uniform(0.4, 1.6)) * rng.uniform(0.8, 1.2, 64)
        reached = plan_layer(load, pools, slots).balancedness
        bound = any_plan_bound(load, pools, slots)
        assert reached <= bound + 1e-9, (seed, pools, slots, reached, bound)
        tight += bound - reached < 1e-3
    assert tight >= 20  # the bound is also close: met to 0.1% in a third of the cases at least
    layer = zipf(1.1, seed=0, layers=1)[0]  # 256 experts
    assert abs(plan_layer(layer, 72, 4).balancedness - any_plan_bound(layer, 72, 4)) < 1e-4
