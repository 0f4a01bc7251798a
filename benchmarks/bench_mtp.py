"""MTP speculative decoding in process: acceptance rate and decode tokens/s with and without MTP, per batch size.

  .venv/bin/python benchmarks/bench_mtp.py [--batches 1,8,32] [--prompt-len 32] [--new-tokens 48] [--random]

The model: the tiny preset trained on the Python standard library's source (services/training, `--train-steps`
main steps), then its MTP layer trained with the main model frozen (services/training/mtp.py, `--mtp-steps`), made
once under --cache-dir; `--random` uses the random tiny preset instead (acceptance on random weights means
nothing: its MTP layer guesses at random). Prompts: the first --prompt-len tokens of held-out modules' windows
(code the training never saw). Greedy, ignore_eos, --threads torch threads (default 1). Each run generates
--waves x B requests with at most B running (a finished request's place goes to the next, so the batch stays
full: a closed batch would wait on its slowest sequence). Decode tokens/s = R * (N - 1) / (t(N) - t(1)) for R
requests (bench_engine.py's method), best of --repeats runs with the two engines interleaved; acceptance =
accepted drafts / drafts over the N-token runs; ms per step and tokens per step (per running sequence) from the
runner's steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.format.model_writer import write_random_model  # noqa: E402
from services.format.presets import preset_config  # noqa: E402
from services.gateway.config import DEFAULT_MTP_MAX_BATCH  # noqa: E402
from services.gateway.engine import Engine  # noqa: E402
from services.gateway.sampling import SamplingParams  # noqa: E402
from services.training.corpus import held_out_windows  # noqa: E402
from services.training.trainer import TrainConfig, write_trained_model  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_dir(cache: Path, preset: str, random: bool, train_steps: int, mtp_steps: int) -> Path:
    if random:
        path = cache / f"{preset}-random"
        if not (path / "config.json").exists():
            write_random_model(path, preset_config(preset), seed=0)
        return path
    from services.training.mtp import write_mtp_trained_model

    main, path = cache / f"{preset}-trained-{train_steps}", cache / f"{preset}-trained-{train_steps}-mtp-{mtp_steps}"
    if not (main / "config.json").exists():
        log(f"training the {preset} model {train_steps} steps")
        write_trained_model(
            main,
            preset,
            TrainConfig(steps=train_steps),
            on_step=lambda s, n, loss: s % 25 == 0 and log(f"  step {s}: {loss:.3f}"),
        )
    if not (path / "config.json").exists():
        log(f"training its MTP layer {mtp_steps} steps (main model frozen)")
        result = write_mtp_trained_model(
            main,
            path,
            TrainConfig(steps=mtp_steps),
            on_step=lambda s, n, loss: s % 25 == 0 and log(f"  step {s}: {loss:.3f}"),
        )
        log(f"MTP loss {result.losses[0]:.2f} -> {sum(result.losses[-10:]) / 10:.2f} in {result.seconds:.0f} s")
    return path


def prompts_for(model: Path, n: int, length: int) -> list[list[int]]:
    windows = [w[:length] for w in held_out_windows(model, length=64, per_module=16)]
    return [windows[i % len(windows)] for i in range(n)]


class StepClock:
    """Counts a runner's steps and the seconds they take."""

    def __init__(self, engine: Engine):
        self.steps, self.seconds, execute = 0, 0.0, engine.core.runner.execute

        def timed_execute(plan):
            t = time.perf_counter()
            try:
                return execute(plan)
            finally:
                self.steps, self.seconds = self.steps + 1, self.seconds + time.perf_counter() - t

        engine.core.runner.execute = timed_execute


def measure(engines: dict[str, Engine], prompts: list[list[int]], batch: int, new_tokens: int, repeats: int) -> dict:
    """Every prompt generated with at most `batch` running (continuous batching: a finished request's place is
    taken by the next), best of `repeats`, the engines interleaved in each repeat. -> {name: figures}."""
    clocks = {name: StepClock(engine) for name, engine in engines.items()}

    def run(name, n):
        engines[name].scheduler.max_running = batch
        t = time.perf_counter()
        out = engines[name].generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
        return time.perf_counter() - t, out

    for name in engines:
        run(name, 2)  # warm-up
    best = {name: dict(t1=float("inf"), tn=float("inf"), runs=[]) for name in engines}
    for _ in range(repeats):
        for name in engines:
            t1 = run(name, 1)[0]
            best[name]["t1"] = min(best[name]["t1"], t1)
            clock = clocks[name]
            steps, seconds = clock.steps, clock.seconds
            t, out = run(name, new_tokens)
            best[name]["runs"].append(len(prompts) * (new_tokens - 1) / (t - t1))  # this repeat's decode tok/s
            if t < best[name]["tn"]:
                best[name].update(tn=t, out=out, steps=clock.steps - steps, step_s=clock.seconds - seconds)
    figures = {}
    for name, b in best.items():
        drafts, accepted = sum(g.draft_tokens for g in b["out"]), sum(g.accepted_tokens for g in b["out"])
        figures[name] = dict(
            decode_tok_s=len(prompts) * (new_tokens - 1) / (b["tn"] - b["t1"]),
            drafts=drafts,
            accepted=accepted,
            steps=b["steps"],
            runs=b["runs"],
            ms_per_step=1000 * b["step_s"] / b["steps"],
            out=b["out"],
        )
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8,32")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--waves", type=int, default=3, help="requests per run: this many times the batch")
    ap.add_argument(
        "--min-requests",
        type=int,
        default=24,
        help="requests per run at least this many (acceptance differs from prompt to prompt: a few are no sample)",
    )
    ap.add_argument("--preset", default="tiny", help="tiny (3 layers), or deep (24: MTP's pass a small part of a step)")
    ap.add_argument("--random", action="store_true", help="the random preset (acceptance means nothing)")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--mtp-steps", type=int, default=300)
    ap.add_argument("--spec-tokens", default="1", help="num_speculative_tokens of the MTP engines, comma-separated")
    ap.add_argument(
        "--mtp-max-batch",
        type=int,
        default=DEFAULT_MTP_MAX_BATCH,
        help="the MTP engines' --mtp-max-batch (0: draft at every batch size)",
    )
    ap.add_argument("--cache-dir", default=".cache/bench")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: steady figures on a shared machine, "
        "where two threads' barriers spin while the other is descheduled)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = model_dir(Path(args.cache_dir), args.preset, args.random, args.train_steps, args.mtp_steps)
    options = dict(cache_tokens=8192, block_size=16, prefix_caching=False)  # repeats compute their prompts
    ks = [int(k) for k in args.spec_tokens.split(",")]
    engines = {"plain": Engine.from_dir(model, **options)}
    for k in ks:
        engines[f"mtp{k}"] = Engine.from_dir(
            model, mtp=True, num_speculative_tokens=k, mtp_max_batch=args.mtp_max_batch, **options
        )
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        n = max(args.waves * b, args.min_requests)
        got = measure(engines, prompts_for(model, n, args.prompt_len), b, args.new_tokens, args.repeats)
        plain = got.pop("plain")
        expected = [g.token_ids for g in plain.pop("out")]
        for k in ks:
            spec = got[f"mtp{k}"]
            assert [g.token_ids for g in spec.pop("out")] == expected, f"MTP (k={k}) changed the output"
            rows.append(
                dict(
                    batch=b,
                    k=k,
                    requests=n,
                    plain=plain,
                    mtp=spec,
                    speedup=spec["decode_tok_s"] / plain["decode_tok_s"],
                    acceptance=spec["accepted"] / max(1, spec["drafts"]),
                )
            )
            log(f"batch {b}: {rows[-1]}")
    print(
        f"\nmodel {model.name}, max({args.waves} x batch, {args.min_requests}) requests (at most batch running), "
        f"prompt {args.prompt_len}, MTP engines' mtp_max_batch {args.mtp_max_batch}, "
        f"{args.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads, best of {args.repeats}"
    )
    print(
        "| batch | drafts a step (k) | decode tok/s plain | with MTP | ratio | acceptance (accepted / drafts) "
        "| ms per step plain | with MTP | tokens per step with MTP |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, m = r["plain"], r["mtp"]
        tokens = r["requests"] * args.new_tokens
        print(
            f"| {r['batch']} | {r['k']} | {p['decode_tok_s']:.1f} | {m['decode_tok_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['acceptance']:.1%} ({m['accepted']} / {m['drafts']}) | {p['ms_per_step']:.2f} | "
            f"{m['ms_per_step']:.2f} | {tokens / m['steps'] / min(r['batch'], r['requests']):.2f} |"
        )
    print(
        "every repeat's ratio (with MTP / plain, decode tok/s of the same repeat): "
        + "; ".join(
            f"batch {r['batch']} k {r['k']}: "
            + ", ".join(f"{m / p:.2f}x" for p, m in zip(r["plain"]["runs"], r["mtp"]["runs"]))
            for r in rows
        )
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": str(model), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
