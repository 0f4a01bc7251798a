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
    result = CliRunner().invoke(app, ["placement", "plan", "--load", str(path), "--pools", "4", "--slots-per-pool", "5", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["seconds"] >= 0 and len(out["layers"]) == 3
    assert all(len(layer["pools"]) == 4 for layer in out["layers"])
    assert sorted({e for pool in out["layers"][0]["pools"] for e in pool}) == list(range(16))


@pytest.mark.parametrize("content,args,message", [
    (None, ["--pools", "4", "--slots-per-pool", "5"], "no load file"),
    ("{not json", ["--pools", "4", "--slots-per-pool", "5"], "not valid JSON"),
    ('{"load": [[1, 2, 3, 4]]}', ["--pools", "1", "--slots-per-pool", "2"], "cannot hold"),
])
def test_placement_plan_cli_errors(tmp_path, content, args, message):
    path = tmp_path / "load.json"
    if content is not None:
        path.write_text(content)
    result = CliRunner().invoke(app, ["placement", "plan", "--load", str(path), *args])
    assert result.exit_code == 2 and message in result.output


def test_tight_budgets_with_many_replicas_still_pack():
    """Every slot used and hot experts on every pool: greedy packing alone can corner itself."""
    rng = np.random.default_rng(5)
    for seed in range(20):
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
