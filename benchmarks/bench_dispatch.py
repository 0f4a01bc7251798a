"""Where one MoE layer's round trip to the pools goes: the gateway's dispatch client (RemoteExperts) against the
2 pool processes of `expertmesh up` (`small` preset, fp8 dispatch), for T routed tokens (random top-k routing),
over each pool transport (a unary Forward call per pool per layer, or the long-lived ForwardStream), the
transports interleaved round by round.

  .venv/bin/python benchmarks/bench_dispatch.py [--tokens 1,32] [--calls 300] [--rounds 3]
      [--replicas-per-expert 2 --clients dealt,fewest]

`--clients`: which dispatch clients to compare (default: stream,unary): `stream`, `unary`, and over the stream
`dealt` (every layer dealt over the replicas by their shares) and `fewest` (every layer to the fewest pools that
hold its experts); with `--replicas-per-expert 2` every expert is on both pools.

Per layer (medians over the calls of the best round): the whole dispatch as the gateway's compute thread waits
for it; gateway encode (quantize to e4m3, build every pool's request) and send; per pool request: the round
trip from send to the compute thread taking the answer, split by the pool's monotonic stamps (same host) into
the way there (serialization, grpc's send thread, the wire, the pool waking), the pool's decode+check and expert
compute and encode, the way back (grpc both sides, the gateway's reader thread) and the hand-off to the compute
thread (which may be busy with the shared expert then); and the gateway's combine (decode the partial sums and
add them). Each column is a median of its own, so the parts add up to the round trip only roughly.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.dispatch import POOL_TRANSPORTS  # noqa: E402
from services.format.config import ModelConfig  # noqa: E402
from services.format.model_writer import write_random_model  # noqa: E402
from services.format.presets import preset_config  # noqa: E402
from services.gateway.remote_experts import RemoteExperts  # noqa: E402
from services.state.placement_store import RedisPlacementStore  # noqa: E402
from tests.local_deployment import UpProcess  # noqa: E402


def one_round(remote: RemoteExperts, layer: int, cfg: ModelConfig, tokens: int, calls: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(tokens)
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    totals = []
    for i in range(calls + 20):
        hidden = torch.randn(tokens, cfg.hidden_size, generator=g)  # [T, H]
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])  # [T, K]
        weights = torch.full((tokens, k), 1.0 / k)  # [T, K]
        if i == 20:  # after the warm-up
            remote.timings = []
        started = time.perf_counter()
        remote.start(layer, hidden, idx, weights)()
        if i >= 20:
            totals.append(time.perf_counter() - started)
    timings, remote.timings = remote.timings, None
    med = lambda key: statistics.median(t[key] for t in timings if key in t) * 1e3  # noqa: E731
    return {
        "total": statistics.median(totals) * 1e3,
        "encode": med("encode_s"),
        "send": med("send_s"),
        "round_trip": med("round_trip_s"),
        "there": med("there_s"),
        "pool_decode": med("decode_s"),
        "compute": med("compute_s"),
        "pool_encode": med("pool_encode_s"),
        "back": med("back_s"),
        "handoff": med("handoff_s"),
        "combine": med("combine_s"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", default="1,32")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per transport; the best is shown")
    ap.add_argument("--cache-dir", default=".cache/bench")
    ap.add_argument("--clients", default=",".join(POOL_TRANSPORTS), help="stream, unary, dealt, fewest")
    ap.add_argument("--replicas-per-expert", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the gateway's compute thread under `up` on this machine
    model = Path(args.cache_dir) / f"{args.preset}-fp8"
    if not (model / "config.json").exists():
        write_random_model(model, preset_config(args.preset), seed=0)
    cfg = ModelConfig.from_file(model)
    sizes = [int(t) for t in args.tokens.split(",")]
    rounds: dict[tuple[int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as home:
        extra = ["--replicas-per-expert", str(args.replicas_per_expert)]
        up = UpProcess(model, 2, "fp8", Path(home), extra=extra)
        try:
            placement = RedisPlacementStore(up.redis).get()
            layer = sorted(placement.replicas)[0]
            options = {
                **{t: {"transport": t} for t in POOL_TRANSPORTS},
                "dealt": {"fewest_pools_max_tokens": 0},
                "fewest": {"fewest_pools_max_tokens": max(sizes)},
            }
            remotes = {c: RemoteExperts(placement, "fp8", **options[c]) for c in args.clients.split(",")}
            for _ in range(args.rounds):
                for tokens in sizes:
                    for client, remote in remotes.items():
                        rounds.setdefault((tokens, client), []).append(
                            one_round(remote, layer, cfg, tokens, args.calls)
                        )
            for remote in remotes.values():
                remote.close()
        finally:
            up.stop()
    print(
        f"preset {args.preset}, 2 pools, {args.replicas_per_expert} replicas of each expert, fp8 dispatch, layer "
        f"{layer}, {args.calls} calls a round, best of "
        f"{args.rounds} interleaved rounds (ms, medians)"
    )
    print(
        "| tokens | client | layer total | gateway encode + send | pool round trip = there + pool decode + compute "
        "+ pool encode + back + hand-off | gateway combine |"
    )
    print("|---|---|---|---|---|---|")
    for (tokens, client), rs in rounds.items():
        r = min(rs, key=lambda r: r["total"])
        print(
            f"| {tokens} | {client} | {r['total']:.2f} | {r['encode']:.2f} + {r['send']:.2f} | "
            f"{r['round_trip']:.2f} = {r['there']:.2f} + {r['pool_decode']:.2f} + {r['compute']:.2f} + "
            f"{r['pool_encode']:.2f} + {r['back']:.2f} + {r['handoff']:.2f} | {r['combine']:.2f} |"
        )
    print("every round's layer total:")
    for (tokens, client), rs in rounds.items():
        print(f"  {tokens} tokens, {client}: " + ", ".join(f"{r['total']:.2f}" for r in rs))


if __name__ == "__main__":
    main()
