"""The placement planner at DeepSeek-V3 scale: 58 MoE layers x 256 experts, 64 to 320 pools, 32+ redundant
slots, under Zipf-skewed load; planner time and pool balancedness (mean / max pool load) before and after.

  .venv/bin/python benchmarks/bench_planner.py [--skip-rebalance]

First the planner against EPLB's greedy (DeepSeek's published policy, re-implemented here: each redundant slot to
the expert with the highest load per replica, then replicas heaviest first onto the least loaded GPU that has a
slot left; it does not stop two replicas of one expert sharing a GPU) on the same loads. The planner's figure is
with its replica shares (each replica's share of its expert's tokens, chosen per packing), beside the same
packing split evenly. Upper bounds on balancedness: `heaviest` = mean / max(mean, heaviest replica) of the
replication that minimises that replica; `slot-aware` adds the lightest replicas (of other experts) that must
share its pool when every slot is used, as both planners do; `any count` is the best slot-aware bound over every
replica count (leaving slots empty), over the same greedy replication of each count; `shares` bounds plans with
any shares, slots left empty or not (`shares_bound`). At V3 scale and at the test scale (tests/test_planner.py: 64
experts).
"Before" is the static spread (one replica per expert, dealt round-robin); "after" is the planner's placement.
A re-plan after 5% load drift from the planned placement shows how many replicas move.
Then the wall time of one live rebalance (plan + two-phase rollout) on the `small` preset: `expertmesh up`
with 2 pools of 40 slots (64 experts: 25% redundant), after a burst of generation.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.autoscaler.packing import Packing, fill  # noqa: E402
from services.autoscaler.planner import moves, plan, replica_counts  # noqa: E402

LAYERS, EXPERTS = 58, 256
SHAPES = [(64, 5), (144, 2), (288, 1), (320, 1)]  # pools x slots per pool: 320, 288, 288, 320 slots
# (name, layers, experts, [(pools, slots)], [zipf s]): V3 scale, and the test scale (a quarter of the experts)
SCALES = [
    ("V3", LAYERS, EXPERTS, [(72, 4), *SHAPES], [1.1, 1.0, 0.6]),
    ("test", 6, 64, [(18, 4), (16, 5)], [1.1, 1.0, 0.6]),
]


def zipf(s: float, seed: int, layers: int = LAYERS, experts: int = EXPERTS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = 1e6 / np.arange(1, experts + 1) ** s
    return np.stack([rng.permutation(base) for _ in range(layers)])


def eplb_greedy(layer: np.ndarray, pools: int, slots: int) -> tuple[np.ndarray, int]:
    """EPLB's greedy on one layer -> (pool loads, pools holding two replicas of one expert)."""
    counts = np.ones(layer.shape[0], dtype=np.int64)
    for _ in range(pools * slots - layer.shape[0]):
        counts[int(np.argmax(layer / counts))] += 1
    weight = np.repeat(layer / counts, counts)
    expert = np.repeat(np.arange(layer.shape[0]), counts)
    pool_load, used = np.zeros(pools), np.zeros(pools, dtype=np.int64)
    holds = np.zeros((pools, layer.shape[0]), dtype=np.int64)
    for i in np.argsort(-weight, kind="stable"):
        pool = int(np.argmin(np.where(used < slots, pool_load, np.inf)))
        pool_load[pool] += weight[i]
        used[pool] += 1
        holds[pool, expert[i]] += 1
    return pool_load, int((holds > 1).any(axis=1).sum())


def bounds(layer: np.ndarray, pools: int, slots: int) -> tuple[float, float, float]:
    """Upper bounds on one layer's balancedness: heaviest replica, slot-aware, slot-aware over any replica count."""
    mean, e = layer.sum() / pools, layer.shape[0]
    out = []
    for n in range(e, min(pools * slots, e * pools) + 1):
        per_replica = layer / replica_counts(layer, n, pools)
        heaviest = int(np.argmax(per_replica))
        companions = max(0, slots - 1 - (pools * slots - n))  # the heaviest replica's pool has this many others
        lightest = np.sort(np.delete(per_replica, heaviest))[:companions].sum()
        out.append((per_replica[heaviest], per_replica[heaviest] + lightest))
    heaviest, slot_aware = out[-1]
    return mean / max(mean, heaviest), mean / max(mean, slot_aware), mean / max(mean, min(b for _, b in out))


def slot_cost(weight: np.ndarray, size: np.ndarray, t: float, c: float, pools: int, slots: int) -> np.ndarray:
    """[K] total load and [K] number of experts of K groups -> [K] the fewest slots each group takes (replicas plus
    slots left empty) for no pool to exceed t; inf where none does.

    A group of g experts with N replicas, joined through pools they share, spans P <= N - g + 1 pools; their
    other slots * P - N slots hold other experts' whole replicas (at least c each) or stay empty. More pools add
    t of room for `slots` slots (t > slots * c), so P = N - g + 1 is the cheapest; the group needs
    N + max(0, slots * P - N - floor((P t - load) / c)) slots."""
    p = np.arange(1, pools + 1)[None]  # [1, P]
    n = p + size[:, None] - 1  # [K, P] replicas
    room = p * t - weight[:, None]  # [K, P]
    fillers = np.floor(np.maximum(room, 0.0) / c + 1e-9)
    cost = n + np.maximum(0, slots * p - n - fillers)
    return np.where(room >= 0, cost, np.inf).min(axis=1)


def shares_bound(layer: np.ndarray, pools: int, slots: int) -> tuple[float, bool]:
    """Upper bound on one layer's balancedness with any shares and slots left empty where that helps ->
    (bound, whether a group of linked experts might beat it).

    Shares move load only between pools that hold a replica of one expert. An expert alone among split experts
    on its pools takes slot_cost(its load, 1, T) slots for a maximum T; all experts' costs must fit in
    pools x slots. The least T for which they do bounds the maximum. Experts linked through shared pools form one
    group, which spans one pool fewer than apart (slot_cost of their summed load); the flag says whether a group
    of two or three of the 40 heaviest costs fewer slots than apart at that T (then the bound may not hold)."""
    key = (np.sort(layer).tobytes(), pools, slots)
    if key not in _SHARES_BOUND:
        _SHARES_BOUND[key] = _shares_bound(np.sort(layer)[::-1], pools, slots)
    return _SHARES_BOUND[key]


_SHARES_BOUND: dict[tuple[bytes, int, int], tuple[float, bool]] = {}  # the layers are permutations of one load


def _shares_bound(layer: np.ndarray, pools: int, slots: int) -> tuple[float, bool]:
    mean, c, ones = layer.sum() / pools, max(float(layer.min()), 1e-12 * layer.max()), np.ones(layer.size)

    def cost(t: float) -> np.ndarray:
        return slot_cost(layer, ones, t, c, pools, slots)

    lo, hi = mean, float(layer.max()) + slots * float(layer.max())
    if cost(lo).sum() <= pools * slots:
        return 1.0, False
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(mid).sum() <= pools * slots else (mid, hi)
    alone = cost(lo)  # [E] just below the bound
    top = np.arange(min(40, layer.size))
    groups = [np.asarray(g) for k in (2, 3) for g in itertools.combinations(top.tolist(), k)]
    if not groups or slots == 1:
        return mean / hi, False
    members = np.stack([np.pad(g, (0, 3 - g.size), constant_values=-1) for g in groups])  # [K, 3], -1 pads
    weight = np.where(members >= 0, layer[members], 0.0).sum(axis=1)
    apart = np.where(members >= 0, alone[members], 0.0).sum(axis=1)
    together = slot_cost(weight, (members >= 0).sum(axis=1), lo, c, pools, slots)
    return mean / hi, bool((together < apart).any())


def greedy_start(layer: np.ndarray, pools: int, slots: int) -> float:
    """Balancedness of the planner's packing before its local search (what the planner did before it had one)."""
    counts = replica_counts(layer, pools * slots, pools)
    pack = Packing(layer / counts, pools, slots)
    fill(pack, np.argsort(-(layer / counts), kind="stable"), counts.copy())
    loads = np.asarray(pack.pool_load())
    return float(loads.mean() / loads.max())


def compare() -> None:
    print(f"planner vs EPLB's greedy (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(
        "| scale | zipf s | pools x slots | planner with shares (mean / min layer) | planner split evenly "
        "| plan s wall / CPU | EPLB greedy (mean / min) | greedy s | pools doubled by the greedy "
        "| planner before its search | bound: heaviest / slot-aware / any count | bound with shares "
        "| layers a linked group might beat it |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, layers, experts, shapes, exponents in SCALES:
        for s in exponents:
            load = zipf(s, seed=0, layers=layers, experts=experts)
            for pools, slots in shapes:
                wall, cpu = time.perf_counter(), time.process_time()
                layer_plans = plan(load, pools, slots)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                planned = [lp.balancedness for lp in layer_plans]
                even = np.mean([lp.even_balancedness for lp in layer_plans])
                t = time.perf_counter()
                greedy = [eplb_greedy(layer, pools, slots) for layer in load]
                greedy_s = time.perf_counter() - t
                eplb = [g.mean() / g.max() for g, _ in greedy]
                start = np.mean([greedy_start(layer, pools, slots) for layer in load])
                bound = np.mean([bounds(layer, pools, slots) for layer in load], axis=0)
                with_shares = [shares_bound(layer, pools, slots) for layer in load]
                print(
                    f"| {name} {layers}x{experts} | {s} | {pools} x {slots} | {np.mean(planned):.3f} / "
                    f"{min(planned):.3f} | {even:.3f} | {wall:.3f} / {cpu:.3f} | {np.mean(eplb):.3f} / "
                    f"{min(eplb):.3f} | {greedy_s:.3f} | {sum(d for _, d in greedy)} of {pools * layers} "
                    f"| {start:.3f} | {bound[0]:.3f} / {bound[1]:.3f} / {bound[2]:.3f} "
                    f"| {np.mean([b for b, _ in with_shares]):.3f} | {sum(f for _, f in with_shares)} |"
                )


def spread_balancedness(load: np.ndarray, pools: int) -> float:
    out = []
    for layer in load:
        per_pool = np.bincount(np.arange(EXPERTS) % pools, weights=layer, minlength=pools)
        out.append(per_pool.mean() / per_pool.max())
    return float(np.mean(out))


def rebalance_wall_time() -> None:
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from services.autoscaler.rebalance import propose
    from services.autoscaler.rollout import rollout
    from services.cli.gateway_client import GatewayClient
    from services.format.model_writer import write_random_model
    from services.format.presets import preset_config
    from services.state.load_store import RedisLoadStore
    from services.state.placement_store import RedisPlacementStore
    from tests.local_deployment import UpProcess

    model = Path(".cache/bench/small-fp8")
    if not (model / "config.json").exists():
        write_random_model(model, preset_config("small"), seed=0)
    with tempfile.TemporaryDirectory() as home:
        up = UpProcess(model, 2, "fp8", Path(home), extra=["--slots-per-pool", "40"])
        try:
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(2, 16000, (32,), generator=g).tolist() for _ in range(16)]
            client = GatewayClient(up.gateway, timeout_s=600)
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda p: client.generate(None, p, 16, ignore_eos=True), prompts))
            client.close()
            time.sleep(0.6)
            store = RedisPlacementStore(up.redis)
            started = time.perf_counter()
            placement = store.get()
            load = RedisLoadStore.from_url(up.redis, placement.layers, placement.num_experts).window(600)
            proposal = propose(placement, load)
            planned = time.perf_counter() - started
            result = rollout(store, proposal.proposed, placement.version, grace_s=2.0)
            total = time.perf_counter() - started
        finally:
            up.stop()
    print(
        f"\nlive rebalance on the small preset (2 pools x 40 slots, 6 MoE layers x 64 experts): "
        f"balancedness {proposal.balancedness_before:.3f} -> {proposal.balancedness_after:.3f}; "
        f"{result.loaded} replicas loaded, {result.unloaded} dropped; plan {planned:.2f} s, "
        f"total {total:.2f} s including the 2.0 s grace before old replicas are dropped"
    )


def replans() -> None:
    print(f"\nre-plans at {LAYERS} layers x {EXPERTS} experts")
    print(
        "| zipf s | pools x slots | redundant | plan s wall / CPU | balancedness before | after (mean / min layer) "
        "| re-plan s wall / CPU | re-plan balancedness (split evenly) | replicas moved after 5% drift |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for s in (1.1, 1.0, 0.6):
        load = zipf(s, seed=0)
        for pools, slots in [(72, 4), *SHAPES]:
            wall, cpu = time.perf_counter(), time.process_time()
            layers = plan(load, pools, slots)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            after = [lp.balancedness for lp in layers]
            drift = load * np.random.default_rng(1).uniform(0.95, 1.05, load.shape)
            rewall, recpu = time.perf_counter(), time.process_time()
            again = plan(drift, pools, slots, current=[lp.pools for lp in layers])
            rewall, recpu = time.perf_counter() - rewall, time.process_time() - recpu
            moved = sum(moves(a.pools, b.pools) for a, b in zip(layers, again))
            print(
                f"| {s} | {pools} x {slots} | {pools * slots - EXPERTS} | {wall:.3f} / {cpu:.3f} "
                f"| {spread_balancedness(load, pools):.3f} | {np.mean(after):.3f} / {min(after):.3f} "
                f"| {rewall:.3f} / {recpu:.3f} | {np.mean([lp.balancedness for lp in again]):.3f} "
                f"({np.mean([lp.even_balancedness for lp in again]):.3f}) "
                f"| {moved} of {pools * slots * LAYERS} |"
            )


def main() -> None:
    compare()
    replans()


if __name__ == "__main__":
    main()
    if "--skip-rebalance" not in sys.argv:
        rebalance_wall_time()
