"""Replica shares for a packed layer: how much of each expert's load each of its replicas takes.

Given which pools hold which replicas, the shares that minimise the most loaded pool are found by water-filling:
one expert at a time, its load is poured over its replicas' pools onto what the other experts put there (the
least loaded pools first, to a common level), sweep after sweep over the experts with several replicas. Each
step lowers the sum of squared pool loads, which is convex, so the sweeps converge to its minimum; at that
minimum no load can pass from a pool to a less loaded one through an expert both hold, which is what a minimal
maximum needs too. The sweeps stop once no share moves, once the most loaded pool has not come down by `GAIN`
of the mean pool load over `PATIENCE` sweeps (the sum of squares converges slowly on long chains of shared pools,
the maximum sooner), or after `MAX_SWEEPS`. Experts with one replica take it all. Deterministic: experts in index
order, fixed tolerances, a bound on sweeps.
"""

from __future__ import annotations

import numpy as np

MAX_SWEEPS = 200
GAIN = 1e-5  # of the mean pool load: what the maximum must come down by ...
PATIENCE = 5  # ... within this many sweeps for them to go on


def water_fill(others: np.ndarray, load: float) -> np.ndarray:
    """[R] load already on each replica's pool, the expert's load -> [R] its load per replica (summing to `load`)
    that raises the least loaded pools to a common level."""
    below = np.sort(others)
    level = (load + np.cumsum(below)) / np.arange(1, below.size + 1)  # [R] level if the k lowest pools take it
    fits = np.append(below[1:], np.inf) >= level  # the next pool is above that level: k is the answer
    return np.maximum(level[int(np.argmax(fits))] - others, 0.0)


def balance_shares(load: np.ndarray, pools: list[list[int]]) -> list[list[float]]:
    """load [E]; pools: pool -> experts it holds (one replica each) -> expert -> share per replica, replicas in
    increasing pool order; shares sum to 1 (even for an expert without load)."""
    load = np.maximum(np.asarray(load, dtype=np.float64), 0.0)
    pool_of = np.asarray([p for p, experts in enumerate(pools) for _ in experts], dtype=np.int64)  # [N] replicas
    expert_of = np.asarray([e for experts in pools for e in experts], dtype=np.int64)  # [N]
    count = np.bincount(expert_of, minlength=load.shape[0])  # [E] replicas per expert
    pool_load = np.bincount(pool_of, weights=(load / np.maximum(count, 1))[expert_of], minlength=len(pools))
    order = np.argsort(expert_of, kind="stable")  # replicas grouped by expert, each group in pool order
    starts = np.concatenate([[0], np.cumsum(count)])  # [E + 1]
    split = [e for e in np.flatnonzero((count > 1) & (load > 0)).tolist()]
    where = {e: pool_of[order[starts[e] : starts[e + 1]]] for e in split}  # expert -> its replicas' pools
    part = {e: np.full(count[e], load[e] / count[e]) for e in split}  # expert -> its load per replica
    mean = pool_load.mean()
    peaks = [float(pool_load.max())]  # the most loaded pool after each sweep
    for _ in range(MAX_SWEEPS if split and peaks[0] > mean * (1 + GAIN) else 0):
        moved = 0.0
        for e in split:
            h = where[e]
            others = pool_load[h] - part[e]
            new = water_fill(others, float(load[e]))
            moved = max(moved, float(np.abs(new - part[e]).max()))
            pool_load[h] = others + new
            part[e] = new
        peaks.append(float(pool_load.max()))
        if moved <= mean * 1e-12 or (len(peaks) > PATIENCE and peaks[-1 - PATIENCE] - peaks[-1] < mean * GAIN):
            break
    even = [[1.0 / c] * c if c else [] for c in count.tolist()]
    for e in split:
        even[e] = (part[e] / load[e]).tolist()
    return even


def pool_loads(load: np.ndarray, pools: list[list[int]], shares: list[list[float]]) -> np.ndarray:
    """[pools] expected load per pool when each expert's load is split by `shares` (replicas in pool order)."""
    out = np.zeros(len(pools))
    seen = [0] * len(shares)  # replicas of each expert met so far, in pool order
    for pool, experts in enumerate(pools):
        for expert in experts:
            out[pool] += float(load[expert]) * shares[expert][seen[expert]]
            seen[expert] += 1
    return out
