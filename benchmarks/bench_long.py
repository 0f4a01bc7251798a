"""Long prompts under concurrency, in process (tiny preset: YaRN to 160K positions): for each prompt length,
1 and C concurrent prompts: time to first token, the total against the same prompts run one after another,
the decode inter-token latency of a request that is already running while the prompts prefill (p50/p99
against its idle inter-token latency), and the process's peak memory.

Usage: .venv/bin/python benchmarks/bench_long.py [--lengths 1024 4096 16384] [--concurrency 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from services.format.model_writer import write_random_model  # noqa: E402
from services.format.presets import preset_config  # noqa: E402
from services.gateway.engine import Engine  # noqa: E402
from services.gateway.requests import Request  # noqa: E402
from services.gateway.sampling import SamplingParams  # noqa: E402


def peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, prompts: list[list[int]], new_tokens: int, with_runner: bool) -> dict:
    """Submit every prompt at once (beside an already running decode when `with_runner`); step until idle."""
    core = engine.core
    times: dict[int, list[float]] = {}

    def on_event(i):
        return lambda ev: times.setdefault(i, []).append(time.perf_counter())

    runner = None
    if with_runner:
        runner = Request(prompt(16, 99), SamplingParams(max_tokens=100_000, ignore_eos=True), on_event=on_event(-1))
        core.submit(runner)
        for _ in range(12):  # warm: its idle inter-token latency
            core.step()
    idle = list(times.get(-1, []))
    started = time.perf_counter()
    reqs = [
        Request(p, SamplingParams(max_tokens=new_tokens, ignore_eos=True), on_event=on_event(i))
        for i, p in enumerate(prompts)
    ]
    for r in reqs:
        core.submit(r)
    while not all(r.done for r in reqs):
        core.step()
    total = time.perf_counter() - started
    prefill_end = max(times[i][0] for i in range(len(reqs)))
    if runner is not None:
        core.cancel(runner)
        core.step()
    during = [b - a for a, b in zip(times.get(-1, []), times.get(-1, [])[1:]) if started <= b <= prefill_end]
    return {
        "total": total,
        "ttft": [times[i][0] - started for i in range(len(reqs))],
        "idle_itl": statistics.median([b - a for a, b in zip(idle, idle[1:])]) if len(idle) > 2 else None,
        "busy_itl": sorted(during),
    }


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = Path(tempfile.mkdtemp()) / "tiny"
    write_random_model(model, preset_config("tiny"), seed=0)
    for length in args.lengths:
        engine = Engine.from_dir(model, cache_tokens=(args.concurrency + 1) * (length + args.new_tokens) + 2048)
        prompts = [prompt(length, i) for i in range(args.concurrency)]
        run(engine, [prompt(64, 1000)], 4, False)  # warm-up
        alone = [run(engine, [p], args.new_tokens, False)["total"] for p in prompts]
        peak_rss_reset()
        one = run(engine, prompts[:1], args.new_tokens, True)
        peak_one = peak_rss_mib()
        peak_rss_reset()
        together = run(engine, prompts, args.new_tokens, True)
        peak_all = peak_rss_mib()
        ratio = together["total"] / sum(alone)
        print(
            f"{length:6d} tokens x1: TTFT {one['ttft'][0]:.2f} s; running decode ITL idle "
            f"{one['idle_itl'] * 1e3:.1f} ms, while it prefills p50 {pct(one['busy_itl'], 0.5) * 1e3:.1f} / p99 "
            f"{pct(one['busy_itl'], 0.99) * 1e3:.1f} ms; peak RSS {peak_one:.0f} MiB"
        )
        print(
            f"{length:6d} tokens x{args.concurrency}: total {together['total']:.2f} s vs {sum(alone):.2f} s one "
            f"after another ({ratio:.2f}x); TTFT p50 {statistics.median(together['ttft']):.2f} s, max "
            f"{max(together['ttft']):.2f} s; running decode ITL p50 {pct(together['busy_itl'], 0.5) * 1e3:.1f} / p99 "
            f"{pct(together['busy_itl'], 0.99) * 1e3:.1f} ms; peak RSS {peak_all:.0f} MiB",
            flush=True,
        )


if __name__ == "__main__":
    main()
