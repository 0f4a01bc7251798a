"""Distributed serving (gateway + 2 expert pools as real processes, `expertmesh up`) against the in-process
engine, in one run, on the `small` preset.

  .venv/bin/python benchmarks/bench_distributed.py [--concurrency 1,8,32,64] [--new-tokens 32]
      [--variant stream=--pool-transport=stream --variant unary=--pool-transport=unary]
      [--model DIR --variant plain= --variant mtp=--mtp]

`--model`: a checkpoint to serve instead of the random preset (prompts are then its held-out text windows, as
bench_mtp.py's; with two or more variants every one is also compared with the first, e.g. MTP against plain).

For each concurrency C: C streaming requests at once (prompt 32 tokens, greedy, EOS ignored). Decode tok/s at C
concurrent is measured while all C requests are decoding: the tokens that arrive between the last request's
first token and the first request's last token, over that window. (Over the whole run, from the first first
token to the last token, it also counts the ramp: gRPC requests reach the gateway over some milliseconds, so
the first step admits only some of them and the others' prefill runs while those decode; the in-process
engine gets all C before its first step. Both figures are printed, and the last request's first token, from
the submissions.) Inter-token latency is the gap between
consecutive tokens of a request (p50, p99). The in-process engine runs the same scheduler with the same
requests. Each figure is the best of `--repeats` runs, the in-process and distributed runs interleaved so that
both see the same state of a machine whose speed drifts; every run's ratio is printed too. Also: wire bytes
sent to pools per token per MoE layer (whole ForwardRequest messages), fp8 against bf16 dispatch, on the same
routed batches.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.attention.batch import SequenceChunk, StepBatch  # noqa: E402
from services.attention.kv_cache import SequenceBlocks  # noqa: E402
from services.cli.gateway_client import GatewayClient  # noqa: E402
from services.format.model_writer import write_random_model  # noqa: E402
from services.format.presets import preset_config  # noqa: E402
from services.gateway.engine import Engine  # noqa: E402
from services.gateway.remote_experts import RemoteExperts  # noqa: E402
from services.gateway.sampling import SamplingParams  # noqa: E402
from services.gateway.scheduler import Request  # noqa: E402
from services.state.placement_store import RedisPlacementStore  # noqa: E402
from tests.local_deployment import UpProcess  # noqa: E402

PROMPT_LEN = 32


TEXT_PROMPTS: list[list[int]] = []  # --model: held-out text windows, used instead of random token ids


def prompts(n: int, vocab: int) -> list[list[int]]:
    if TEXT_PROMPTS:
        return [TEXT_PROMPTS[i % len(TEXT_PROMPTS)] for i in range(n)]
    g = torch.Generator().manual_seed(n)
    return [torch.randint(2, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(n)]


def summarize(stamps: list[list[float]], concurrency: int, start: float) -> dict:
    """stamps: per request, the arrival time of each generated token. With --waves (C streams of requests one
    after another) decode tok/s is C x the streams' decode rate: tokens after each request's first over the time
    from its first token to its last, summed over every request (prefill left out)."""
    first, last = min(s[0] for s in stamps), max(s[-1] for s in stamps)
    all_in, first_out = max(s[0] for s in stamps), min(s[-1] for s in stamps)  # the window all C are decoding
    in_window = sum(1 for s in stamps for t in s if all_in < t <= first_out)
    gaps = sorted(b - a for s in stamps for a, b in zip(s, s[1:]))
    pick = lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))] * 1e3  # noqa: E731
    if WAVES > 1:
        in_window = concurrency * sum(len(s) - 1 for s in stamps)
        all_in, first_out = 0.0, sum(s[-1] - s[0] for s in stamps)
    return {
        "decode_tok_s": in_window / (first_out - all_in) if first_out > all_in else float("nan"),
        "whole_run_tok_s": sum(len(s) - 1 for s in stamps) / (last - first),
        "itl_p50_ms": pick(0.50),
        "itl_p99_ms": pick(0.99),
        "ttft_max_s": max(s[0] for s in stamps) - start,  # the last request's first token, from the submissions
    }


WAVES = 1  # --waves: requests per stream, one after another (C x WAVES prompts: more text than C prompts)


def run_in_process(engine: Engine, concurrency: int, new_tokens: int) -> dict:
    n = concurrency * WAVES
    stamps: list[list[float]] = [[] for _ in range(n)]
    requests = []
    engine.scheduler.max_running = concurrency
    for i, p in enumerate(prompts(n, engine.cfg.vocab_size)):
        requests.append(
            Request(
                p,
                SamplingParams(max_tokens=new_tokens, ignore_eos=True),
                on_event=lambda ev, i=i: stamps[i].append(time.perf_counter()),
            )
        )
    start = time.perf_counter()
    for r in requests:
        engine.scheduler.submit(r)
    engine.core.run_until_idle()
    return summarize(stamps, concurrency, start)


def run_distributed(gateway: str, concurrency: int, new_tokens: int, vocab: int) -> dict:
    from expertmesh.v1 import gateway_pb2

    n = concurrency * WAVES
    stamps: list[list[float]] = [[] for _ in range(n)]
    client = GatewayClient(gateway, timeout_s=600)
    texts = prompts(n, vocab)

    def stream(first: int) -> None:
        for i in range(first, n, concurrency):  # this stream's requests, one after another
            request = gateway_pb2.GenerateRequest(
                token_ids=texts[i], sampling=gateway_pb2.SamplingParams(max_tokens=new_tokens, ignore_eos=True)
            )
            for msg in client.stub.Generate(request, timeout=600):
                if msg.token_ids:
                    stamps[i].append(time.perf_counter())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    return summarize(stamps, concurrency, start)


def dispatch_bytes(engine: Engine, redis_url: str) -> dict[str, float]:
    """Wire bytes per token per MoE layer, per dispatch dtype, for the routing of a real 32-sequence prefill."""
    placement = RedisPlacementStore(redis_url).get()
    seqs = [SequenceBlocks() for _ in range(32)]
    trace: list = []
    chunks = [SequenceChunk(s, p) for s, p in zip(seqs, prompts(32, engine.cfg.vocab_size))]
    for chunk in chunks:
        engine.cache.reserve(chunk.seq, len(chunk.token_ids))
    batch = StepBatch.build(chunks, engine.cache).to(engine.model.device)
    engine.model.forward(batch, engine.cache, routing_trace=trace)
    for s in seqs:
        engine.cache.release(s)
    layer, idx = trace[0]  # [T, K] real routing of the first MoE layer
    idx = idx.cpu()
    hidden = torch.randn(idx.shape[0], engine.cfg.hidden_size)
    weights = torch.full(idx.shape, 1.0 / idx.shape[1])
    out = {}
    for dtype in ("fp8", "bf16"):
        remote = RemoteExperts(placement, dtype)
        remote.start(layer, hidden, idx, weights)()
        out[dtype] = remote.bytes_sent / hidden.shape[0]
        remote.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model", type=Path, help="a checkpoint directory to serve (default: the random --preset)")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--pools", type=int, default=2)
    ap.add_argument("--cache-dir", default=".cache/bench")
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs per figure")
    ap.add_argument(
        "--waves",
        type=int,
        default=1,
        help="requests per stream, one after another: decode tok/s is then C x (tokens after the first) / "
        "(time from first to last token), summed over every request (prefill left out)",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="a distributed deployment to compare, its extra `up` arguments (e.g. 'unary=--pool-transport unary'); "
        "and env:NAME=VALUE words for its environment (e.g. 'passive=--threads 2 env:OMP_WAIT_POLICY=PASSIVE'); "
        "repeat for more; each gets its own `up`, all interleaved run by run (default: one with no extra arguments)",
    )
    ap.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "auto"),
        help="the in-process engine, the gateway and the pools on this device",
    )
    args = ap.parse_args()
    global WAVES
    WAVES = args.waves
    model = args.model or Path(args.cache_dir) / f"{args.preset}-fp8"
    if args.model:
        from services.training.corpus import held_out_windows

        TEXT_PROMPTS.extend(w[:PROMPT_LEN] for w in held_out_windows(model, length=64, per_module=16))
    elif not (model / "config.json").exists():
        write_random_model(model, preset_config(args.preset), seed=0)
    levels = [int(c) for c in args.concurrency.split(",")]
    cache_tokens = max(*levels, 32) * (PROMPT_LEN + args.new_tokens) * 2  # 32: dispatch_bytes' prefill
    variants = dict(v.split("=", 1) for v in args.variant) or {"distributed": ""}

    engine = Engine.from_dir(model, cache_tokens=cache_tokens, device=args.device)
    local_runs: dict[int, list[dict]] = {c: [] for c in levels}
    remote_runs: dict[str, dict[int, list[dict]]] = {v: {c: [] for c in levels} for v in variants}
    with contextlib.ExitStack() as stack:
        ups = {}
        for name, extra in variants.items():
            home = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            words = extra.split()
            env = dict(w[len("env:") :].split("=", 1) for w in words if w.startswith("env:"))  # env:NAME=VALUE
            extra = ["--micro-batches", str(args.micro_batches), "--device", args.device]
            extra += [w for w in words if not w.startswith("env:")]
            ups[name] = UpProcess(model, args.pools, "fp8", home, cache_tokens=cache_tokens, extra=extra, env=env)
            stack.callback(ups[name].stop)
        for c in levels:  # warm-ups at every level (first-use costs of both sides are not measured)
            run_in_process(engine, c, 8)
            for up in ups.values():
                run_distributed(up.gateway, c, 8, engine.cfg.vocab_size)
        for _ in range(args.repeats):
            for c in levels:
                local_runs[c].append(run_in_process(engine, c, args.new_tokens))
                for name, up in ups.items():
                    remote_runs[name][c].append(run_distributed(up.gateway, c, args.new_tokens, engine.cfg.vocab_size))
        report(args, engine, levels, local_runs, remote_runs, variants)
        wire = dispatch_bytes(engine, next(iter(ups.values())).redis)
    print(
        f"\nwire bytes per token per MoE layer (all pools, whole ForwardRequest messages): fp8 {wire['fp8']:.0f}, "
        f"bf16 {wire['bf16']:.0f}, ratio {wire['fp8'] / wire['bf16']:.3f}"
    )


def report(args, engine, levels, local_runs, remote_runs, variants) -> None:
    best = lambda rs: max(rs, key=lambda r: r["decode_tok_s"])  # noqa: E731
    print(
        f"{args.model or 'preset ' + args.preset} on {engine.model.device}, {args.pools} pools, "
        f"{args.micro_batches} micro-batches, "
        f"fp8 dispatch, prompt {PROMPT_LEN}, {args.new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads in process, best of {args.repeats} interleaved runs"
    )
    for name, runs in remote_runs.items():
        print(f"\n{name} (up {variants[name] or 'defaults'}):")
        print(
            "| concurrent | in-process tok/s | ITL p50 / p99 ms | distributed tok/s | ITL p50 / p99 ms "
            "| distributed / in-process | whole run: in-process, distributed tok/s, ratio | last first token s |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for c in levels:
            l, r = best(local_runs[c]), best(runs[c])
            print(
                f"| {c} | {l['decode_tok_s']:.1f} | {l['itl_p50_ms']:.1f} / {l['itl_p99_ms']:.1f} | "
                f"{r['decode_tok_s']:.1f} | "
                f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['decode_tok_s'] / l['decode_tok_s']:.2f}x | "
                f"{l['whole_run_tok_s']:.1f}, {r['whole_run_tok_s']:.1f}, "
                f"{r['whole_run_tok_s'] / l['whole_run_tok_s']:.2f}x | "
                f"{l['ttft_max_s']:.2f}, {r['ttft_max_s']:.2f} |"
            )
        first = next(iter(remote_runs))
        if name != first:
            print(
                f"{name} / {first}, best: "
                + "; ".join(
                    f"{c}: {best(runs[c])['decode_tok_s'] / best(remote_runs[first][c])['decode_tok_s']:.2f}x"
                    for c in levels
                )
                + "; every run: "
                + "; ".join(
                    f"{c}: "
                    + ", ".join(
                        f"{r['decode_tok_s'] / f['decode_tok_s']:.2f}x" for f, r in zip(remote_runs[first][c], runs[c])
                    )
                    for c in levels
                )
            )
        print(
            "every run's distributed / in-process ratio: "
            + "; ".join(
                f"{c}: "
                + ", ".join(f"{x:.2f}x" for x in ratios(local_runs[c], runs[c]))
                + (f" (median {statistics.median(ratios(local_runs[c], runs[c])):.2f}x)" if args.repeats > 1 else "")
                for c in levels
            )
        )
    every = [*local_runs.values(), *(rs for variant in remote_runs.values() for rs in variant.values())]
    if any(math.isnan(r["decode_tok_s"]) for rs in every for r in rs):
        print(
            "nan: a run had no moment when all its requests were decoding (its last first token came after its "
            "first request's last token); raise --new-tokens"
        )


def ratios(local: list[dict], remote: list[dict]) -> list[float]:
    """Each run's distributed / in-process decode tok/s, run by run."""
    return [r["decode_tok_s"] / l["decode_tok_s"] for l, r in zip(local, remote)]


if __name__ == "__main__":
    main()
