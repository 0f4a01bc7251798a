"""Prefix caching, in process: requests that share a system prompt, with the cache on and off in the same run.

Each round and arrival makes a new system prompt of --system tokens (nothing of it cached by an earlier run) and
--requests parts of --user tokens, and runs them through two engines on the same checkpoint, one with prefix
caching and one without, alternated, three ways: one request after another (the system prompt and each part, each
submitted when the one before has finished, as turns of different users arrive); all at once (a burst); and a
conversation (each turn's prompt is the turn before's prompt and output, then its part: the context grows by
--user + --new-tokens a turn, and without the cache every turn computes all of it again). It prints, per arrival
and engine, the wall time, the time to first token (p50 and the worst, from each request's submission) and the
prompt tokens the model computed; and the ratio of the wall times. Outputs are checked equal (greedy).

Usage: .venv/bin/python benchmarks/bench_prefix.py [--preset small] [--system 1024] [--user 64] [--requests 16]
                                                   [--new-tokens 16] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.bench_long import pct, prompt  # noqa: E402
from services.format.model_writer import write_random_model  # noqa: E402
from services.format.presets import preset_config  # noqa: E402
from services.gateway.engine import Engine  # noqa: E402
from services.gateway.requests import Request  # noqa: E402
from services.gateway.sampling import SamplingParams  # noqa: E402

ARRIVALS = ("one after another", "all at once", "a conversation")


def run(engine: Engine, system: list[int], parts: list[list[int]], new_tokens: int, arrival: str) -> dict:
    """Requests of `system` + each part through the engine's serving core, as `arrival` says (a conversation: each
    turn's prompt is the turn before's prompt and output, then its part): wall time, each request's time to
    first token, the prompt tokens the prefill chunks carried, the outputs."""
    core, computed = engine.core, [0]
    execute = core.runner.execute

    def counting(plan):
        computed[0] += sum(len(c.token_ids) for c in plan.chunks if c.prefill)
        return execute(plan)

    core.runner.execute = counting
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    reqs, context = [], system
    start = time.perf_counter()
    try:
        for part in parts:
            submitted, first = time.perf_counter(), []
            req = Request(
                context + part, params, on_event=lambda ev, f=first, s=submitted: f or f.append(time.perf_counter() - s)
            )
            reqs.append((req, first))
            core.submit(req)
            if arrival != "all at once":
                core.run_until_idle()
            if arrival == "a conversation":
                context = req.prompt + req.output
        core.run_until_idle()
    finally:
        core.runner.execute = execute
    wall = time.perf_counter() - start
    ttft = sorted(f[0] for _, f in reqs)
    return dict(
        wall=wall,
        ttft_p50=statistics.median(ttft),
        ttft_max=ttft[-1],
        computed=computed[0],
        cached=sum(r.cached_tokens for r, _ in reqs),
        outputs=[r.output for r, _ in reqs],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--cache-dir", default=".cache/bench")
    ap.add_argument("--system", type=int, default=1024, help="tokens of the shared system prompt")
    ap.add_argument("--user", type=int, default=64, help="tokens of each request's own part")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = Path(args.cache_dir) / f"{args.preset}-fp8"
    if not (model / "config.json").exists():
        write_random_model(model, preset_config(args.preset), seed=0)
    cache_tokens = 2 * args.requests * (args.system + args.requests * (args.user + args.new_tokens))
    engines = {on: Engine.from_dir(model, cache_tokens=cache_tokens, prefix_caching=on) for on in (False, True)}
    for engine in engines.values():
        run(engine, prompt(80, 999), [[5]], 2, "one after another")  # warm-up
    results: dict[tuple[str, bool], list[dict]] = {}
    for r in range(args.rounds):
        for a, arrival in enumerate(ARRIVALS):
            system = prompt(args.system, 1000 + 10 * r + a)  # nothing of it cached by an earlier run
            parts = [prompt(args.user, 2000 + 1000 * r + 100 * a + i) for i in range(args.requests)]
            got = {}
            for on in (False, True) if r % 2 == 0 else (True, False):
                got[on] = run(engines[on], system, parts, args.new_tokens, arrival)
                results.setdefault((arrival, on), []).append(got[on])
            if got[True]["outputs"] != got[False]["outputs"]:
                raise SystemExit(f"round {r}, {arrival}: outputs differ with prefix caching")
    print(
        f"preset {args.preset}, {args.requests} requests of a {args.system}-token system prompt + {args.user} own "
        f"tokens, {args.new_tokens} new tokens, {args.threads} threads, {args.rounds} rounds (single runs listed)"
    )
    print("| arrival | prefix caching | wall s | TTFT p50 s | TTFT worst s | prompt tokens computed | cached |")
    print("|---|---|---|---|---|---|---|")
    for arrival in ARRIVALS:
        for on in (False, True):
            runs = results[(arrival, on)]
            print(
                f"| {arrival} | {'on' if on else 'off'} | {_col(runs, 'wall')} | {_col(runs, 'ttft_p50')} | "
                f"{_col(runs, 'ttft_max')} | {runs[0]['computed']} | {runs[0]['cached']} |"
            )
        ratios = sorted(
            off["wall"] / on["wall"] for off, on in zip(results[(arrival, False)], results[(arrival, True)])
        )
        listed = " / ".join(f"{x:.2f}x" for x in ratios)
        print(f"  {arrival}: wall time off / on {listed} (p50 {pct(ratios, 0.5):.2f}x)")


def _col(runs: list[dict], key: str) -> str:
    return " / ".join(f"{x[key]:.2f}" for x in runs)


if __name__ == "__main__":
    main()
