"""Per-replica shares: the placement's record of them (JSON, validation, expected pool loads) and the planner's
choice of them (shares.py, and the plans and proposals that carry them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.autoscaler.planner import plan, plan_layer
from services.autoscaler.rebalance import propose
from services.autoscaler.shares import balance_shares, pool_loads, water_fill
from services.errors import InvalidRequestError
from services.state.placement import Placement, Pool


def two_pool_placement() -> Placement:
    """One layer, 3 experts: expert 0 on both pools, expert 1 on pool a, expert 2 on pool b."""
    pools = {p: Pool(p, f"127.0.0.1:{i + 1}", slots=2) for i, p in enumerate(["a", "b"])}
    return Placement(1, pools, {3: [["a", "b"], ["a"], ["b"]]})


def test_shares_round_trip_through_json_and_copy():
    placement = two_pool_placement()
    placement.set_shares(3, [[0.25, 0.75], [1.0], [1.0]])
    assert placement.shares == {3: {0: [0.25, 0.75]}}  # only the uneven split is kept
    raw = json.loads(placement.to_json())
    assert raw["shares"] == {"3": {"0": [0.25, 0.75]}}
    again = Placement.from_json(placement.to_json())
    assert again.shares_of(3, 0) == [0.25, 0.75] and again.shares_of(3, 1) == [1.0]
    assert placement.copy().shares == placement.shares
    again.validate([3], 3)


def test_json_without_shares_loads_and_splits_evenly():
    raw = json.loads(two_pool_placement().to_json())
    assert "shares" not in raw  # even everywhere: nothing written
    placement = Placement.from_json(json.dumps(raw))
    assert placement.shares == {} and placement.shares_of(3, 0) == [0.5, 0.5]
    placement.set_shares(3, [[0.5, 0.5], [1.0], [1.0]])
    assert placement.shares == {}


@pytest.mark.parametrize(
    "shares,message",
    [
        ({3: {0: [1.0]}}, "layer 3 expert 0 has 2 replicas but 1 shares"),
        ({3: {0: [0.5, 0.6]}}, "layer 3 expert 0: shares sum to 1.1, not 1"),
        ({3: {0: [-0.5, 1.5]}}, "layer 3 expert 0: shares must be finite and >= 0"),
        ({3: {0: [float("nan"), 1.0]}}, "layer 3 expert 0: shares must be finite and >= 0"),
        ({3: {7: [1.0]}}, "shares given for layer 3 expert 7"),
        ({4: {0: [1.0]}}, "shares given for layer 4 expert 0"),
    ],
)
def test_invalid_shares_are_refused_naming_layer_and_expert(shares, message):
    placement = two_pool_placement()
    placement.shares = shares
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(")):
        placement.validate([3], 3)


def test_shares_within_tolerance_are_accepted():
    placement = two_pool_placement()
    placement.shares = {3: {0: [0.3, 0.7 + 5e-7]}}
    placement.validate([3], 3)


def test_malformed_shares_in_json_are_refused():
    raw = json.loads(two_pool_placement().to_json())
    raw["shares"] = {"3": [[0.5, 0.5]]}  # a list where an object of experts belongs
    with pytest.raises(InvalidRequestError, match="malformed placement"):
        Placement.from_json(json.dumps(raw))


def test_pool_loads_and_balancedness_follow_the_shares():
    placement = two_pool_placement()
    tokens = [100.0, 10.0, 30.0]
    assert placement.pool_loads(3, tokens) == {"a": 60.0, "b": 80.0}  # even: 50 each from expert 0
    placement.set_shares(3, [[0.6, 0.4], [1.0], [1.0]])
    assert placement.pool_loads(3, tokens) == pytest.approx({"a": 70.0, "b": 70.0})
    assert placement.balancedness({3: tokens}) == pytest.approx(1.0)


def test_pool_loads_skip_an_expert_without_replicas():
    placement = two_pool_placement()
    placement.replicas[3][1] = []  # its pool drained, before a re-plan places it again
    assert placement.pool_loads(3, [100.0, 10.0, 30.0]) == {"a": 50.0, "b": 80.0}


def test_reset_shares_after_a_replica_is_added():
    placement = two_pool_placement()
    placement.set_shares(3, [[0.25, 0.75], [1.0], [1.0]])
    placement.replicas[3][0].append("c")
    placement.reset_shares(3, 0)
    assert placement.shares == {} and placement.shares_of(3, 0) == pytest.approx([1 / 3] * 3)


def test_water_fill_raises_the_lowest_pools_to_one_level():
    assert water_fill(np.array([5.0, 1.0, 3.0]), 4.0).tolist() == [0.0, 3.0, 1.0]  # level 4
    assert water_fill(np.array([0.0, 0.0]), 6.0).tolist() == [3.0, 3.0]


def test_balance_shares_minimises_the_most_loaded_pool_of_a_chain():
    # pools 0-3; expert 0 (100) on pools 0 and 1, expert 1 (100) on pools 1 and 2, expert 2 (100) on pools 2
    # and 3; singles: 40 on pool 0, 0 on pool 3 (expert 3 is idle). The best maximum: 340 over 4 pools = 85.
    load = np.array([100.0, 100.0, 100.0, 40.0, 0.0])
    pools = [[0, 3], [0, 1], [1, 2], [2, 4]]
    shares = balance_shares(load, pools)
    assert all(sum(s) == pytest.approx(1.0) for s in shares)
    assert all(x >= 0 for s in shares for x in s)
    balanced = pool_loads(load, pools, shares)
    assert balanced.sum() == pytest.approx(load.sum())
    assert balanced.max() == pytest.approx(85.0, rel=1e-3)
    even = pool_loads(load, pools, [[1 / len(s)] * len(s) for s in shares])
    assert even.max() == pytest.approx(100.0)  # 40 + 50 + ... : the even split leaves pool 1 at 100
    assert shares[4] == [1.0]  # an idle expert keeps an even split


def test_planner_shares_sum_to_one_and_beat_the_even_split_on_a_skewed_layer():
    # 5 pools x 3 slots for 12 experts: the hottest (1000) on 3 pools, 467 on 2; an even split leaves 0.943
    load = np.array([79.0, 299.0, 102.0, 170.0, 139.0, 65.0, 1000.0, 218.0, 118.0, 72.0, 89.0, 467.0])
    lp = plan_layer(load, num_pools=5, slots_per_pool=3)
    assert len(lp.shares) == 12
    for expert, shares in enumerate(lp.shares):
        assert len(shares) == sum(expert in pool for pool in lp.pools)
        assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0
    assert sum(lp.pool_load) == pytest.approx(load.sum())
    assert lp.even_balancedness < 0.95 and lp.balancedness > 0.99
    assert lp.pool_load == pytest.approx(pool_loads(load, lp.pools, lp.shares).tolist())


def test_re_plans_carry_shares_too():
    rng = np.random.default_rng(4)
    load = np.stack([rng.permutation(1e5 / np.arange(1, 33) ** 1.1) for _ in range(2)])
    first = plan(load, 4, 10)
    again = plan(load * rng.uniform(0.95, 1.05, load.shape), 4, 10, current=[lp.pools for lp in first])
    for lp in again:
        assert all(sum(s) == pytest.approx(1.0) for s in lp.shares)
        assert lp.balancedness >= lp.even_balancedness - 1e-12


def test_a_proposal_records_the_planned_shares_on_the_placement():
    pools = [Pool(f"pool-{i}", f"127.0.0.1:{i + 1}", slots=10) for i in range(4)]
    rng = np.random.default_rng(5)
    replicas = {layer: [[pools[e % 4].pool_id] for e in range(32)] for layer in (1, 2)}
    placement = Placement(1, {p.pool_id: p for p in pools}, replicas)
    load = np.stack([rng.permutation(1e5 / np.arange(1, 33) ** 1.1) for _ in range(2)])
    proposal = propose(placement, load)
    proposed = proposal.proposed
    proposed.validate([1, 2], 32)
    assert proposed.shares  # some expert's split is not even
    by_layer = {layer: load[i].tolist() for i, layer in enumerate((1, 2))}
    assert proposal.balancedness_after == pytest.approx(proposed.balancedness(by_layer))
    assert proposal.balancedness_after > proposal.balancedness_before
    again = Placement.from_json(proposed.to_json())
    assert again.balancedness(by_layer) == pytest.approx(proposal.balancedness_after)


@pytest.mark.slow  # a real redis-server
def test_rebalance_rolls_out_a_change_of_shares_alone(redis_server):
    """`expertmesh rebalance` where the best plan keeps every replica in place and only its shares change: the
    shares are published as a new placement version (no pool is called: the pools' addresses are closed ports)."""
    import time

    from typer.testing import CliRunner

    from services.cli.app import app
    from services.state.load_store import RedisLoadStore
    from services.state.placement_store import RedisPlacementStore

    store = RedisPlacementStore(redis_server.url)
    store.publish(two_pool_placement())
    counts = np.array([[100, 60, 10]], dtype=np.int64)  # split evenly: pool a 110, pool b 60
    RedisLoadStore.from_url(redis_server.url, [3], 3).write({int(time.time() // 5): counts})
    args = ["rebalance", "--redis", redis_server.url, "--window", "30", "--json"]
    dry = json.loads(CliRunner().invoke(app, [*args, "--dry-run"]).stdout)
    assert dry["moves"] == 0 and dry["balancedness_before"] < 0.8 and dry["balancedness_after"] > 0.99
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert done["loads"] == done["unloads"] == 0 and done["version"] == 2
    assert store.get().shares_of(3, 0) == pytest.approx([0.25, 0.75], abs=1e-6)  # both pools 85 tokens
