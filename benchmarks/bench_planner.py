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
replica count (leaving slots empty), over the same greedy replication of each count; `any plan` bounds every
plan: any shares, slots used or empty, replicas sharing pools in any pattern (`any_plan_bound`). At V3 scale
and at the test scale (tests/test_planner.py: 64 experts).
"Before" is the static spread (one replica per expert, dealt round-robin); "after" is the planner's placement.
A re-plan after 5% load drift from the planned placement shows how many replicas move.
Then the wall time of one live rebalance (plan + two-phase rollout) on the `small` preset: `expertmesh up`
with 2 pools of 40 slots (64 experts: 25% redundant), after a burst of generation.
"""

from __future__ import annotations

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


# fractions f of T / slots tried as the weight c in any_plan_bound (every one gives a valid bound; the least is kept)
FILLER_FRACTIONS = np.linspace(0.0025, 0.9975, 200)


def any_plan_bound(layer: np.ndarray, pools: int, slots: int) -> float:
    """Upper bound on one layer's balancedness for any plan: any shares, slots used or left empty, replicas of
    experts sharing pools in any pattern.

    For a maximum pool load T and any weight 0 <= c < T / slots: split the experts into the connected parts of
    "has a replica on the same pool". A part of g experts, N replicas, load W on P pools of K = slots x P slots is
    connected, so g <= N - P + 1 <= (slots - 1) P + 1, and W <= P T; together they give
    K (T - (slots - 1) c) >= W + (g - 1) (T - slots c), i.e. K >= X + (g - 1) rho with X the sum of
    x_e = w_e / (T - (slots - 1) c) over its experts and rho = (T - slots c) / (T - (slots - 1) c) < 1. Alone an
    expert takes ceil(x_e) slots; a part takes ceil(X + (g - 1) rho), fewer by floor(sum of (ceil(x_e) - x_e)
    - (g - 1) rho), and fewer by s >= 1 only if the sum of its (ceil(x_e) - x_e - rho) reaches s (1 - rho). So
    every part together saves at most floor(sum of max(0, ceil(x_e) - x_e - rho) / (1 - rho)) slots: T needs
    sum of ceil(x_e) minus that <= pools x slots, for every c. The least such T bounds the maximum (the count is
    monotone in T for each c = f T / slots); c ranges over FILLER_FRACTIONS."""
    mean = layer.sum() / pools
    f = FILLER_FRACTIONS[:, None]  # [F, 1]

    def fits(t: float) -> bool:
        room = t * (1 - (slots - 1) * f / slots)  # [F, 1]
        x = layer[None] / room  # [F, E]
        need = np.ceil(x - 1e-12)  # [F, E] slots each expert takes alone
        rho = (1 - f) / (1 - (slots - 1) * f / slots)  # [F, 1]
        saved = np.floor((np.maximum(0.0, need - x - rho).sum(axis=1, keepdims=True) / (1 - rho)) + 1e-9)
        cost = need.sum(axis=1, keepdims=True) - (saved if slots > 1 else 0.0)  # [F, 1]
        return bool((cost <= pools * slots).all())

    lo, hi = mean, float(layer.max()) * (slots + 1)
    if fits(lo):
        return 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return mean / hi


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
        "| planner before its search | bound: heaviest / slot-aware / any count "
        "| bound: any plan |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
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
                any_plan = [any_plan_bound(layer, pools, slots) for layer in load]
                print(
                    f"| {name} {layers}x{experts} | {s} | {pools} x {slots} | {np.mean(planned):.3f} / "
                    f"{min(planned):.3f} | {even:.3f} | {wall:.3f} / {cpu:.3f} | {np.mean(eplb):.3f} / "
                    f"{min(eplb):.3f} | {greedy_s:.3f} | {sum(d for _, d in greedy)} of {pools * layers} "
                    f"| {start:.3f} | {bound[0]:.3f} / {bound[1]:.3f} / {bound[2]:.3f} "
                    f"| {np.mean(any_plan):.3f} |"
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
