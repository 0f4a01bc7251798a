"""Replicas onto pools with slots, for the planner: a greedy first packing, then a local search on the maximum.

A layer's packing is a [pools, slots] array of expert ids (`num_experts` marks an empty slot). Replicas of one
expert carry equal load, so a slot's expert is all a move needs to know. Constraints kept by every step: a pool
holds at most one replica of an expert, never more replicas than slots, and pinned replicas stay on their pool.

The local search looks at the most loaded pool and at every (replica there, slot elsewhere) pair at once
(numpy over [slots, pools, slots]): a move to an empty slot or a swap with a lighter replica, taking the one whose
larger new pool load is smallest, if that is below the hot pool's load. It is bounded by steps, not by the clock,
so a plan depends on its input only.
"""

from __future__ import annotations

import heapq

import numpy as np

from services.errors import InvalidRequestError


class Packing:
    """Slots of every pool, what each pool holds and carries, and which replicas are pinned."""

    def __init__(self, per_replica: np.ndarray, num_pools: int, slots_per_pool: int):
        e = per_replica.shape[0]
        self.empty = e
        self.weight = np.append(np.maximum(per_replica.astype(np.float64), 0.0), 0.0)  # [E + 1], empty weighs 0
        self.slot = np.full((num_pools, slots_per_pool), e, dtype=np.int64)
        self.wslot = np.zeros((num_pools, slots_per_pool))  # weight of each slot's replica
        self.holds = np.zeros((num_pools, e + 1), dtype=bool)  # column E (empty) stays False
        self.fixed = np.zeros((num_pools, slots_per_pool), dtype=bool)  # pinned replicas' slots
        self.free = np.full(num_pools, slots_per_pool, dtype=np.int64)
        self.load = np.zeros(num_pools)

    def put(self, expert: int, pool: int, pinned: bool = False) -> None:
        j = int(np.argmax(self.slot[pool] == self.empty))
        self.slot[pool, j] = expert
        self.wslot[pool, j] = self.weight[expert]
        self.holds[pool, expert] = True
        self.fixed[pool, j] = pinned
        self.free[pool] -= 1
        self.load[pool] += self.weight[expert]

    def put_many(self, placed: list[tuple[int, int]]) -> None:
        """put() for many (expert, pool) at once: each pool's next empty slots in order, in the order given."""
        if not placed:
            return
        experts, pools = np.asarray(placed, dtype=np.int64).T
        rows, cols = np.nonzero(self.slot == self.empty)  # row-major: each pool's empty slots in order
        first = np.searchsorted(rows, np.arange(self.slot.shape[0]))
        order = np.argsort(pools, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size) - np.searchsorted(pools[order], pools[order])
        self.slot[pools, cols[first[pools] + rank]] = experts
        self.holds[pools, experts] = True
        np.add.at(self.free, pools, -1)
        self.wslot = self.weight[self.slot]
        self.load = self.wslot.sum(axis=1)

    def exchange(self, hot: int, a: int, q: int, b: int) -> None:
        """Swap slot a of pool `hot` with slot b of pool q (either may be empty; neither pinned)."""
        x, y = int(self.slot[hot, a]), int(self.slot[q, b])
        self.slot[hot, a], self.slot[q, b] = y, x
        self.wslot[hot, a], self.wslot[q, b] = self.weight[y], self.weight[x]
        self.holds[hot, x] = self.holds[q, y] = False
        self.holds[q, x] = self.holds[hot, y] = True
        self.holds[:, self.empty] = False
        self.free[hot] += (y == self.empty) - (x == self.empty)
        self.free[q] += (x == self.empty) - (y == self.empty)
        delta = self.weight[x] - self.weight[y]
        self.load[hot] -= delta
        self.load[q] += delta

    def pools(self) -> list[list[int]]:
        return [sorted(x for x in row if x != self.empty) for row in self.slot.tolist()]

    def pool_load(self) -> list[float]:
        return self.weight[self.slot].sum(axis=1).tolist()  # summed afresh: no drift from the steps


def fill(pack: Packing, order: np.ndarray, left: np.ndarray) -> None:
    """Greedy (LPT): experts in `order`, each remaining replica onto the least loaded pool (lowest index on ties)
    that has a free slot and no replica of that expert; when no pool qualifies, `_make_room` frees a slot.
    Pools wait in a heap of (load, pool) and the placements are written to `pack` together."""
    loads, held, heap = _heap_state(pack)
    placed: list[tuple[int, int]] = []
    for expert in order.tolist():
        for _ in range(int(left[expert])):
            skipped = []
            while heap and expert in held[heap[0][1]]:
                skipped.append(heapq.heappop(heap))
            if heap:
                _, pool = heapq.heappop(heap)
                placed.append((expert, pool))
                loads[pool] += pack.weight[expert]
                held[pool].add(expert)
                if len(held[pool]) < pack.slot.shape[1]:
                    heapq.heappush(heap, (loads[pool], pool))
                for item in skipped:
                    heapq.heappush(heap, item)
            else:  # a corner: place what is decided, make room the slow way, then carry on from the new state
                pack.put_many(placed)
                placed = []
                pack.put(expert, _make_room(pack, expert))
                loads, held, heap = _heap_state(pack)
            left[expert] -= 1
    pack.put_many(placed)


def _heap_state(pack: Packing) -> tuple[list[float], list[set[int]], list[tuple[float, int]]]:
    loads = pack.load.tolist()
    held = [set(row) - {pack.empty} for row in pack.slot.tolist()]
    heap = [(loads[p], p) for p in np.flatnonzero(pack.free > 0).tolist()]
    heapq.heapify(heap)
    return loads, held, heap


def _make_room(pack: Packing, expert: int) -> int:
    """Every pool with a free slot already holds `expert`: move some other unpinned replica y from a full pool q
    (without `expert`) to a pool with room (without y), freeing a slot on q. Returns q."""
    for spare in np.flatnonzero(pack.free > 0).tolist():
        b = int(np.argmax(pack.slot[spare] == pack.empty))
        for q in np.flatnonzero(~pack.holds[:, expert]).tolist():
            for a, y in enumerate(pack.slot[q].tolist()):
                if y != pack.empty and not pack.fixed[q, a] and not pack.holds[spare, y]:
                    pack.exchange(q, a, spare, b)
                    return q
    raise InvalidRequestError(f"no pool has room for another replica of expert {expert}")


def best_step(pack: Packing) -> tuple[float, int, int, int, int]:
    """The move or swap off the most loaded pool that minimises the larger of the two pools' new loads:
    (that load, hot pool, its slot, other pool, its slot); the load is inf when nothing is allowed."""
    hot = int(np.argmax(pack.load))
    stuck_x = pack.holds[:, pack.slot[hot]].T | pack.fixed[hot][:, None]  # [K, P]: q holds x's expert, x pinned
    stuck_y = pack.holds[hot][pack.slot] | pack.fixed  # [P, K]: the hot pool holds y's expert, y pinned
    stuck_y[hot] = True
    delta = pack.wslot[hot][:, None, None] - pack.wslot[None]  # [K, P, K]: load leaving the hot pool
    ok = (delta > 0) & ~stuck_x[:, :, None] & ~stuck_y[None]
    peak = np.where(ok, np.maximum(pack.load[hot] - delta, pack.load[None, :, None] + delta), np.inf)
    a, q, b = np.unravel_index(int(np.argmin(peak)), peak.shape)
    return float(peak[a, q, b]), hot, int(a), int(q), int(b)


def relieve(pack: Packing, goal: float, max_steps: int) -> int:
    """Local search: while the most loaded pool is above `goal`, take `best_step` if it lowers that pool's load
    without raising another's to it; stop when none does or after `max_steps`. Returns the steps taken."""
    for step in range(max_steps):
        top = float(pack.load.max())
        if top <= goal:
            return step
        peak, hot, a, q, b = best_step(pack)
        if not peak < top * (1 - 1e-12):
            return step
        pack.exchange(hot, a, q, b)
    return max_steps
