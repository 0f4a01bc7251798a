"""Replica shares for a packed layer: how much of each expert's load each of its replicas takes.

Given which pools hold which replicas, the shares that minimise the most loaded pool are found by water-filling:
one expert at a time, its load is poured over its replicas' pools onto what the other experts put there (the
least loaded pools first, to a common level), sweep after sweep over the experts with several replicas. Each
step lowers the sum of squared pool loads, which is convex, so the sweeps converge to its minimum; at that
minimum no load can pass from a pool to a less loaded one through an expert both hold, which is what a minimal
maximum needs too. The sweeps stop once the most loaded pool has not come down by `GAIN` of the mean pool load
over `PATIENCE` sweeps (the sum of squares converges slowly on long chains of shared pools, the maximum sooner),
or after `MAX_SWEEPS`. Experts with one replica take it all. Deterministic: experts in index order, fixed
tolerances, a bound on sweeps.
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
    holders: list[list[int]] = [[] for _ in range(load.shape[0])]
    for pool, experts in enumerate(pools):
        for expert in experts:
            holders[expert].append(pool)
    where = [np.asarray(h, dtype=np.int64) for h in holders]
    part = [np.full(h.size, load[e] / max(h.size, 1)) for e, h in enumerate(where)]  # load per replica
    pool_load = np.zeros(len(pools))  # [pools]
    for h, x in zip(where, part):
        np.add.at(pool_load, h, x)
    split = [e for e, h in enumerate(where) if h.size > 1 and load[e] > 0]
    gain = GAIN * pool_load.mean()
    peaks = [float(pool_load.max())]  # the most loaded pool after each sweep
    for _ in range(MAX_SWEEPS if split and peaks[0] > pool_load.mean() + gain else 0):
        for e in split:
            h = where[e]
            others = pool_load[h] - part[e]
            part[e] = water_fill(others, float(load[e]))
            pool_load[h] = others + part[e]
        peaks.append(float(pool_load.max()))
        if len(peaks) > PATIENCE and peaks[-1 - PATIENCE] - peaks[-1] < gain:
            break
    return [
        (x / load[e]).tolist() if load[e] > 0 else [1.0 / h.size] * h.size for e, (h, x) in enumerate(zip(where, part))
    ]


def pool_loads(load: np.ndarray, pools: list[list[int]], shares: list[list[float]]) -> np.ndarray:
    """[pools] expected load per pool when each expert's load is split by `shares` (replicas in pool order)."""
    out = np.zeros(len(pools))
    seen = [0] * len(shares)  # replicas of each expert met so far, in pool order
    for pool, experts in enumerate(pools):
        for expert in experts:
            out[pool] += float(load[expert]) * shares[expert][seen[expert]]
            seen[expert] += 1
    return out
