"""The placement planner: a pure function in the spirit of DeepSeek's EPLB.

Per layer, from the per-expert load (tokens) of a window:
1. replicas: every expert gets `min_replicas` (the redundancy floor, as far as the slots allow: first one each,
   then the floor's extra copies); each further slot goes to the expert with the highest load per replica
   (EPLB's `replicate_experts`), never more replicas than pools;
2. packing: replicas, heaviest per-replica load first, onto pools so that pool loads are balanced, no pool holds
   two replicas of one expert, and every pool keeps within its slots. Pinned replicas stay where they are;
   a replica already on a pool stays there while that pool's load remains within `slack` of the mean, so a
   plan moves few replicas when the load has not shifted much.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.errors import InvalidRequestError


@dataclass
class LayerPlan:
    pools: list[list[int]]  # pool -> expert ids (one replica each)
    pool_load: list[float]  # expected tokens per pool (each expert's load split evenly over its replicas)

    @property
    def balancedness(self) -> float:
        loads = np.asarray(self.pool_load)
        return float(loads.mean() / loads.max()) if loads.max() > 0 else 1.0


def replica_counts(load: np.ndarray, slots: int, max_per_expert: int, min_per_expert: int = 1) -> np.ndarray:
    """[E] loads, total slots -> [E] replica counts (>= 1 each, <= max_per_expert, summing to min(slots, cap)).

    Every expert gets `min_per_expert` copies where the slots allow (hottest first when they do not), then
    the rest go by load."""
    e = load.shape[0]
    load = np.maximum(load.astype(np.float64), 0.0)
    counts = np.ones(e, dtype=np.int64)
    floor = min(min_per_expert, max_per_expert)
    room = min(slots, e * max_per_expert) - e
    for expert in np.argsort(-load, kind="stable")[: max(0, room) // max(1, floor - 1)] if floor > 1 else ():
        counts[expert] = floor
    extra = min(slots, e * max_per_expert) - int(counts.sum())
    for _ in range(max(0, extra)):
        per_replica = np.where(counts < max_per_expert, load / counts, -1.0)
        counts[int(np.argmax(per_replica))] += 1
    return counts


def plan_layer(load: np.ndarray, num_pools: int, slots_per_pool: int, current: list[list[int]] | None = None,
               pinned: set[tuple[int, int]] | None = None, slack: float = 0.05, min_replicas: int = 1) -> LayerPlan:
    """load [E]; current: pool -> experts now; pinned: {(expert, pool)} that must stay.

    With a current placement, the plan that keeps replicas in place is taken unless a fresh packing balances
    better by more than `slack` (staying put must not cost the balance it is meant to buy)."""
    fresh = _pack(load, num_pools, slots_per_pool, None, pinned, slack, min_replicas=min_replicas)
    if not current:
        return fresh
    goal = max(fresh.pool_load) * (1 + slack / 2)  # what the fresh packing reaches, near enough
    sticky = _pack(load, num_pools, slots_per_pool, current, pinned, slack, goal, min_replicas)
    return sticky if sticky.balancedness >= fresh.balancedness - slack else fresh


def _pack(load: np.ndarray, num_pools: int, slots_per_pool: int, current: list[list[int]] | None,
          pinned: set[tuple[int, int]] | None, slack: float, goal: float = 0.0, min_replicas: int = 1) -> LayerPlan:
    e = load.shape[0]
    if num_pools * slots_per_pool < e:
        raise InvalidRequestError(f"{num_pools} pools x {slots_per_pool} slots cannot hold {e} experts")
    counts = replica_counts(load, num_pools * slots_per_pool, num_pools, min_replicas)
    per_replica = np.maximum(load.astype(np.float64), 0.0) / counts
    pool_load = np.zeros(num_pools)
    free = np.full(num_pools, slots_per_pool, dtype=np.int64)
    holds = np.zeros((num_pools, e), dtype=bool)
    left = counts.copy()  # replicas still to place per expert

    def put(expert: int, pool: int) -> None:
        holds[pool, expert] = True
        free[pool] -= 1
        left[expert] -= 1
        pool_load[pool] += per_replica[expert]

    for expert, pool in sorted(pinned or ()):
        if not (0 <= pool < num_pools and 0 <= expert < e):
            raise InvalidRequestError(f"pinned replica of expert {expert} on pool {pool} is out of range")
        if left[expert] > 0 and free[pool] > 0 and not holds[pool, expert]:
            put(expert, pool)
    order = np.argsort(-per_replica, kind="stable")
    if current:
        # no packing can beat the mean pool load, nor the heaviest single replica
        target = max(per_replica @ counts / num_pools, per_replica.max()) * (1 + slack)
        pools_of: dict[int, list[int]] = {}
        for pool, experts in enumerate(current[:num_pools]):
            for expert in experts:
                pools_of.setdefault(int(expert), []).append(pool)
        for expert in order:
            for pool in pools_of.get(int(expert), ()):
                if (left[expert] > 0 and free[pool] > 0 and not holds[pool, expert]
                        and pool_load[pool] + per_replica[expert] <= target):
                    put(int(expert), pool)
    locked = {(e, p) for e, p in (pinned or ())}
    for expert in order.tolist():  # heaviest replicas first (LPT); _make_room handles the corners it paints into
        while left[expert] > 0:
            candidates = np.where((free > 0) & ~holds[:, expert], pool_load, np.inf)
            pool = int(np.argmin(candidates))
            if not np.isfinite(candidates[pool]):
                pool = _make_room(expert, holds, free, per_replica, pool_load, locked)
            put(int(expert), pool)
    if current:
        _relieve_hottest(holds, free, per_replica, pool_load, locked, goal, max_steps=2 * int(counts.sum()))
    return LayerPlan([np.flatnonzero(holds[p]).tolist() for p in range(num_pools)], pool_load.tolist())


def _relieve_hottest(holds: np.ndarray, free: np.ndarray, per_replica: np.ndarray, pool_load: np.ndarray,
                     locked: set[tuple[int, int]], goal: float, max_steps: int) -> None:
    """Local search after keeping replicas in place: move a replica off the most loaded pool (to a pool with a
    free slot) or swap it with a lighter one elsewhere, while that lowers the maximum, until it is within `goal`."""
    for _ in range(max_steps):
        hot = int(np.argmax(pool_load))
        if pool_load[hot] <= goal:
            return
        best = None  # (new max of the two pools, replica, target pool, swapped replica or -1)
        for x in sorted(np.flatnonzero(holds[hot]), key=lambda x: -per_replica[x]):
            if (int(x), hot) in locked or per_replica[x] <= 0:
                continue
            for q in np.flatnonzero(~holds[:, x]):
                if free[q] > 0:
                    peak = max(pool_load[hot] - per_replica[x], pool_load[q] + per_replica[x])
                    if peak < pool_load[hot] and (best is None or peak < best[0]):
                        best = (peak, int(x), int(q), -1)
                for y in np.flatnonzero(holds[q] & ~holds[hot]):
                    delta = per_replica[x] - per_replica[y]
                    if delta <= 0 or (int(y), int(q)) in locked:
                        continue
                    peak = max(pool_load[hot] - delta, pool_load[q] + delta)
                    if peak < pool_load[hot] and (best is None or peak < best[0]):
                        best = (peak, int(x), int(q), int(y))
            if best is not None:
                break  # the heaviest movable replica of the hottest pool
        if best is None:
            return
        _, x, q, y = best
        holds[hot, x], holds[q, x] = False, True
        pool_load[hot] -= per_replica[x]
        pool_load[q] += per_replica[x]
        if y < 0:
            free[hot] += 1
            free[q] -= 1
        else:
            holds[q, y], holds[hot, y] = False, True
            pool_load[q] -= per_replica[y]
            pool_load[hot] += per_replica[y]


def _make_room(expert: int, holds: np.ndarray, free: np.ndarray, per_replica: np.ndarray, pool_load: np.ndarray,
               locked: set[tuple[int, int]]) -> int:
    """Every pool with a free slot already holds `expert`: move some other replica y from a full pool q (without
    `expert`) to a pool with room (without y), freeing a slot on q. Returns q."""
    for spare in np.flatnonzero(free > 0):
        for q in np.flatnonzero(~holds[:, expert]):
            for y in np.flatnonzero(holds[q] & ~holds[spare]):
                if (int(y), int(q)) in locked:
                    continue
                holds[q, y], holds[spare, y] = False, True
                free[q] += 1
                free[spare] -= 1
                pool_load[q] -= per_replica[y]
                pool_load[spare] += per_replica[y]
                return int(q)
    raise InvalidRequestError(f"no pool has room for another replica of expert {expert}")


def plan(load: np.ndarray, num_pools: int, slots_per_pool: int, current: list[list[list[int]]] | None = None,
         pinned: set[tuple[int, int, int]] | None = None, min_replicas: int = 1) -> list[LayerPlan]:
    """load [layers, E] -> one LayerPlan per layer. current[layer][pool] -> experts; pinned {(layer, expert, pool)}."""
    load = np.asarray(load, dtype=np.float64)
    if load.ndim != 2:
        raise InvalidRequestError(f"load must be [layers][experts], got {load.ndim} dimensions")
    if (load < 0).any() or not np.isfinite(load).all():
        raise InvalidRequestError("load must be finite and non-negative")
    pinned = pinned or set()
    return [plan_layer(load[i], num_pools, slots_per_pool, current[i] if current else None,
                       {(e, p) for (l, e, p) in pinned if l == i}, min_replicas=min_replicas)
            for i in range(load.shape[0])]


def moves(before: list[list[int]], after: list[list[int]]) -> int:
    """Replicas that a layer's new packing adds to pools (each is one load on some pool)."""
    return sum(len(set(a) - set(b)) for b, a in zip(before, after))
