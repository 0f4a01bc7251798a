"""The placement planner: a pure function in the spirit of DeepSeek's EPLB.

Per layer, from the per-expert load (tokens) of a window:
1. replicas: every expert gets `min_replicas` (the redundancy floor, as far as the slots allow: first one each,
   then the floor's extra copies); each further slot goes to the expert with the highest load per replica
   (EPLB's `replicate_experts`), never more replicas than pools. No packing beats max(mean pool load, heaviest
   replica); the mean is fixed, so while the heaviest replica is above it this choice is also the replica that
   lowers that bound most, and below it no replica lowers the bound;
2. packing (packing.py): replicas, heaviest per-replica load first, onto the least loaded pool that can take them
   (no pool holds two replicas of one expert, every pool keeps within its slots), then a local search that moves
   or swaps replicas off the most loaded pool while that lowers it. Pinned replicas stay where they are;
   a replica already on a pool stays there while that pool's load remains within `slack` of what a fresh plan
   reaches, so a plan moves few replicas when the load has not shifted much;
3. shares (shares.py): how much of its expert's load each replica takes, chosen to minimise the most loaded
   pool for that packing (a replica on a pool that also holds other load takes less of its expert).
The same input gives the same plan: ties go to the lowest index and the search is bounded by steps, not time.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from services.autoscaler.packing import Packing, fill, relieve
from services.autoscaler.shares import balance_shares, pool_loads
from services.errors import InvalidRequestError
from services.state.placement import layer_balancedness

_CLOSE_ENOUGH = 1e-3  # a fresh plan's search stops within 0.1% of max(mean pool load, heaviest replica)


@dataclass
class LayerPlan:
    pools: list[list[int]]  # pool -> expert ids (one replica each)
    pool_load: list[float]  # expected tokens per pool, each expert's load split by `shares`
    shares: list[list[float]]  # expert -> share of its load per replica, replicas in increasing pool order
    even_load: list[float]  # expected tokens per pool were each expert's load split evenly over its replicas

    @property
    def balancedness(self) -> float:
        return layer_balancedness(self.pool_load)

    @property
    def even_balancedness(self) -> float:
        return layer_balancedness(self.even_load)


def with_shares(load: np.ndarray, pools: list[list[int]], even_load: list[float]) -> LayerPlan:
    """A packing's LayerPlan, with the shares that balance it best."""
    shares = balance_shares(load, pools)
    return LayerPlan(pools, pool_loads(load, pools, shares).tolist(), shares, even_load)


def replica_counts(load: np.ndarray, slots: int, max_per_expert: int, min_per_expert: int = 1) -> np.ndarray:
    """[E] loads, total slots -> [E] replica counts (>= 1 each, <= max_per_expert, summing to min(slots, cap)).

    Every expert gets `min_per_expert` copies where the slots allow (hottest first when they do not), then
    the rest go by load."""
    e = load.shape[0]
    load = np.maximum(load.astype(np.float64), 0.0)
    counts = np.ones(e, dtype=np.int64)
    floor = min(min_per_expert, max_per_expert)
    room = min(slots, e * max_per_expert) - e
    if floor > 1:
        counts[np.argsort(-load, kind="stable")[: max(0, room) // (floor - 1)]] = floor
    extra = min(slots, e * max_per_expert) - int(counts.sum())
    # each further replica to the highest load per replica (lowest index on ties), from a heap of (-load/count, e)
    heap = [(-w / c, x) for x, (w, c) in enumerate(zip(load.tolist(), counts.tolist())) if c < max_per_expert]
    heapq.heapify(heap)
    for _ in range(max(0, extra)):
        _, expert = heapq.heappop(heap)
        counts[expert] += 1
        if counts[expert] < max_per_expert:
            heapq.heappush(heap, (-float(load[expert]) / int(counts[expert]), expert))
    return counts


def plan_layer(
    load: np.ndarray,
    num_pools: int,
    slots_per_pool: int,
    current: list[list[int]] | None = None,
    pinned: set[tuple[int, int]] | None = None,
    slack: float = 0.05,
    min_replicas: int = 1,
) -> LayerPlan:
    """load [E]; current: pool -> experts now; pinned: {(expert, pool)} that must stay.

    With a current placement, the plan that keeps replicas in place is taken unless a fresh packing balances
    better by more than `slack` (staying put must not cost the balance it is meant to buy)."""
    load = np.maximum(np.asarray(load, dtype=np.float64), 0.0)
    e = load.shape[0]
    if num_pools * slots_per_pool < e:
        raise InvalidRequestError(f"{num_pools} pools x {slots_per_pool} slots cannot hold {e} experts")
    for expert, pool in pinned or ():
        if not (0 <= pool < num_pools and 0 <= expert < e):
            raise InvalidRequestError(f"pinned replica of expert {expert} on pool {pool} is out of range")
    counts = replica_counts(load, num_pools * slots_per_pool, num_pools, min_replicas)
    fresh = _pack(load / counts, counts, num_pools, slots_per_pool, None, pinned, slack)
    if current:
        sticky = _pack(load / counts, counts, num_pools, slots_per_pool, current, pinned, slack, max(fresh.pool_load))
        chosen = (
            sticky if layer_balancedness(sticky.pool_load) >= layer_balancedness(fresh.pool_load) - slack else fresh
        )
    else:
        chosen = fresh
    return with_shares(load, chosen.pools, chosen.pool_load)


def _pack(
    per_replica: np.ndarray,
    counts: np.ndarray,
    num_pools: int,
    slots_per_pool: int,
    current: list[list[int]] | None,
    pinned: set[tuple[int, int]] | None,
    slack: float,
    reach: float = 0.0,
) -> _Packed:
    """Fresh (no `current`): greedy, then local search to within _CLOSE_ENOUGH of the bound. Sticky: replicas
    stay on their current pools while those stay within `slack` of `reach` (the fresh plan's maximum), then
    greedy for the rest, then local search only down to within `slack` / 2 of `reach`."""
    pack = Packing(per_replica, num_pools, slots_per_pool)
    left = counts.copy()  # replicas still to place per expert
    for expert, pool in sorted(pinned or ()):
        if left[expert] > 0 and pack.free[pool] > 0 and not pack.holds[pool, expert]:
            pack.put(expert, pool, pinned=True)
            left[expert] -= 1
    order = np.argsort(-per_replica, kind="stable")
    # no packing can beat the mean pool load, nor the heaviest single replica
    bound = max(per_replica @ counts / num_pools, per_replica.max())
    if current:
        _keep_current(pack, left, current, order, max(bound, reach) * (1 + slack))
    fill(pack, order, left)  # heaviest replicas first (LPT)
    goal = max(bound, reach) * (1 + slack / 2) if current else bound * (1 + _CLOSE_ENOUGH)
    relieve(pack, goal, max_steps=2 * int(counts.sum()))
    return _Packed(pack.pools(), pack.pool_load())


@dataclass
class _Packed:
    pools: list[list[int]]  # pool -> expert ids
    pool_load: list[float]  # each expert's load split evenly over its replicas


def _keep_current(pack: Packing, left: np.ndarray, current: list[list[int]], order: np.ndarray, target: float) -> None:
    """Replicas already on a pool stay there, heaviest first, while that pool's load stays within `target`."""
    pools_of: dict[int, list[int]] = {}
    for pool, experts in enumerate(current[: pack.load.shape[0]]):
        for expert in experts:
            pools_of.setdefault(int(expert), []).append(pool)
    loads, free, weight, still = pack.load.tolist(), pack.free.tolist(), pack.weight.tolist(), left.tolist()
    held = [set(row) for row in pack.slot.tolist()]
    placed = []
    for expert in order.tolist():
        for pool in pools_of.get(expert, ()):
            if (
                still[expert] > 0
                and free[pool] > 0
                and expert not in held[pool]
                and loads[pool] + weight[expert] <= target
            ):
                placed.append((expert, pool))
                held[pool].add(expert)
                free[pool] -= 1
                loads[pool] += weight[expert]
                still[expert] -= 1
    pack.put_many(placed)
    left[:] = still


def plan(
    load: np.ndarray,
    num_pools: int,
    slots_per_pool: int,
    current: list[list[list[int]]] | None = None,
    pinned: set[tuple[int, int, int]] | None = None,
    min_replicas: int = 1,
) -> list[LayerPlan]:
    """load [layers, E] -> one LayerPlan per layer. current[layer][pool] -> experts; pinned {(layer, expert, pool)}."""
    load = np.asarray(load, dtype=np.float64)
    if load.ndim != 2:
        raise InvalidRequestError(f"load must be [layers][experts], got {load.ndim} dimensions")
    if (load < 0).any() or not np.isfinite(load).all():
        raise InvalidRequestError("load must be finite and non-negative")
    pinned = pinned or set()
    return [
        plan_layer(
            load[i],
            num_pools,
            slots_per_pool,
            current[i] if current else None,
            {(e, p) for (l, e, p) in pinned if l == i},
            min_replicas=min_replicas,
        )
        for i in range(load.shape[0])
    ]


def moves(before: list[list[int]], after: list[list[int]]) -> int:
    """Replicas that a layer's new packing adds to pools (each is one load on some pool)."""
    return sum(len(set(a) - set(b)) for b, a in zip(before, after))
