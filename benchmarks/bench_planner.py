"""The placement planner at DeepSeek-V3 scale: 58 MoE layers x 256 experts, 64 to 320 pools, 32+ redundant
slots, under Zipf-skewed load; planner time and pool balancedness (mean / max pool load) before and after.

  .venv/bin/python benchmarks/bench_planner.py [--skip-rebalance]

"Before" is the static spread (one replica per expert, dealt round-robin); "after" is the planner's placement.
A re-plan after 5% load drift from the planned placement shows how many replicas move.
Then the wall time of one live rebalance (plan + two-phase rollout) on the `small` preset: `expertmesh up`
with 2 pools of 40 slots (64 experts: 25% redundant), after a burst of generation.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.autoscaler.planner import moves, plan  # noqa: E402

LAYERS, EXPERTS = 58, 256
SHAPES = [(64, 5), (144, 2), (288, 1), (320, 1)]  # pools x slots per pool: 320, 288, 288, 320 slots


def zipf(s: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = 1e6 / np.arange(1, EXPERTS + 1) ** s
    return np.stack([rng.permutation(base) for _ in range(LAYERS)])


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
    from tests.local_deployment import UpProcess
    from services.state.load_store import RedisLoadStore
    from services.format.model_writer import write_random_model
    from services.state.placement_store import RedisPlacementStore
    from services.format.presets import preset_config

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
    print(f"\nlive rebalance on the small preset (2 pools x 40 slots, 6 MoE layers x 64 experts): "
          f"balancedness {proposal.balancedness_before:.3f} -> {proposal.balancedness_after:.3f}; "
          f"{result.loaded} replicas loaded, {result.unloaded} dropped; plan {planned:.2f} s, "
          f"total {total:.2f} s including the 2.0 s grace before old replicas are dropped")


def main() -> None:
    print(f"{LAYERS} layers x {EXPERTS} experts")
    print("| zipf s | pools x slots | redundant | plan s | balancedness before | after (mean / min layer) | re-plan s | re-plan balancedness | replicas moved after 5% drift |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in (0.6, 1.0):
        load = zipf(s, seed=0)
        for pools, slots in SHAPES:
            t = time.perf_counter()
            layers = plan(load, pools, slots)
            seconds = time.perf_counter() - t
            after = [lp.balancedness for lp in layers]
            drift = load * np.random.default_rng(1).uniform(0.95, 1.05, load.shape)
            t = time.perf_counter()
            again = plan(drift, pools, slots, current=[lp.pools for lp in layers])
            replan = time.perf_counter() - t
            moved = sum(moves(a.pools, b.pools) for a, b in zip(layers, again))
            print(f"| {s} | {pools} x {slots} | {pools * slots - EXPERTS} | {seconds:.3f} | {spread_balancedness(load, pools):.3f} "
                  f"| {np.mean(after):.3f} / {min(after):.3f} | {replan:.3f} | {np.mean([lp.balancedness for lp in again]):.3f} "
                  f"| {moved} of {pools * slots * LAYERS} |")


if __name__ == "__main__":
    main()
    if "--skip-rebalance" not in sys.argv:
        rebalance_wall_time()
