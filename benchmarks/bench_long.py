"""Long prompts under concurrency, in process (tiny preset: YaRN to 160K positions): for each prompt length,
1 and C concurrent prompts: time to first token, the total against the same prompts run one after another,
the decode inter-token latency of a request that is already running while the prompts prefill (p50/p99
against its idle inter-token latency), and memory: the latent cache, allocated whole when the engine starts (its
size is `--cache-tokens`, here room for twice the C prompts), and the process's peak RSS (VmHWM) during the C
prompts over the RSS of the loaded engine (model and cache): what a step needs beyond the cache.

Usage: .venv/bin/python benchmarks/bench_long.py [--lengths 1024 4096 16384] [--concurrency 8] [--new-tokens 32]
                                                 [--max-decode-stall 4.0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from services.format.model_writer import write_random_model  # noqa: E402
from services.format.presets import preset_config  # noqa: E402
from services.gateway.config import DEFAULT_MAX_DECODE_STALL  # noqa: E402
from services.gateway.engine import Engine  # noqa: E402
from services.gateway.requests import Request  # noqa: E402
from services.gateway.sampling import SamplingParams  # noqa: E402


def peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def rss_mib(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, prompts: list[list[int]], new_tokens: int, with_runner: bool) -> dict:
    """Submit every prompt at once (beside an already running decode when `with_runner`); step until idle.
    busy_itl: the gaps between consecutive tokens of every decoding request (the runner, and prompts that are
    through their prefill) that end before the last prompt's first token, i.e. while some prompt prefills.
    decode_only: the wall times of the steps in that window that carried no prompt tokens (the decode-stall
    bound's reference: it holds a step with prompt tokens to --max-decode-stall times these)."""
    core = engine.core
    times: dict[int, list[float]] = {}
    steps_seen: list[tuple[float, bool, float]] = []  # (ended at, carried prompt tokens, wall seconds)
    observe = core.scheduler.observe

    def timed(plan, seconds):
        steps_seen.append((time.perf_counter(), any(c.prefill for c in plan.chunks), seconds))
        observe(plan, seconds)

    def on_event(i):
        return lambda ev: times.setdefault(i, []).append(time.perf_counter())

    runner = None
    if with_runner:
        # it must outlast the prompts: a step makes at least one token of prefill or of decode progress
        most = sum(map(len, prompts)) + new_tokens + 64
        runner = Request(prompt(16, 99), SamplingParams(max_tokens=most, ignore_eos=True), on_event=on_event(-1))
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
    steps = 0
    core.scheduler.observe = timed
    try:
        while not all(r.done for r in reqs):
            core.step()
            steps += 1
    finally:
        core.scheduler.observe = observe
    total = time.perf_counter() - started
    prefill_end = max(times[i][0] for i in range(len(reqs)))
    if runner is not None:
        core.cancel(runner)
        core.step()
    during = [b - a for ts in times.values() for a, b in zip(ts, ts[1:]) if started <= a and b <= prefill_end]
    return {
        "total": total,
        "steps": steps,
        "ttft": [times[i][0] - started for i in range(len(reqs))],
        "idle_itl": statistics.median([b - a for a, b in zip(idle, idle[1:])]) if len(idle) > 2 else None,
        "busy_itl": sorted(during),
        "decode_only": sorted(s for at, prefill, s in steps_seen if at <= prefill_end and not prefill),
    }


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-decode-stall", type=float, default=DEFAULT_MAX_DECODE_STALL)
    ap.add_argument("--threads", type=int, default=1)  # 2 threads on 2 shared cores: 100x outliers
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = Path(tempfile.mkdtemp()) / "tiny"
    write_random_model(model, preset_config("tiny"), seed=0)
    for length in args.lengths:
        work = args.concurrency * (length + args.new_tokens)
        engine = Engine.from_dir(  # room for the prompts, and for the running decode that outlasts them
            model,
            cache_tokens=2 * work + 4096,
            max_decode_stall=args.max_decode_stall,
            prefix_caching=False,  # the same prompts run alone, then together: each run computes them
        )
        prompts = [prompt(length, i) for i in range(args.concurrency)]
        run(engine, [prompt(64, 1000)], 4, False)  # warm-up
        base = rss_mib("VmRSS")  # the model and the whole cache (torch.zeros touches every page)
        alone = [run(engine, [p], args.new_tokens, False) for p in prompts]
        one = run(engine, prompts[:1], args.new_tokens, True)
        peak_rss_reset()
        together = run(engine, prompts, args.new_tokens, False)
        together["peak_mib"] = rss_mib() - base
        cache = engine.cache
        together["cache_kib"] = cache.data.element_size() * cache.num_layers * cache.width / 1024
        together["cache_mib"] = cache.data.numel() * cache.data.element_size() / 2**20
        together["cache_slots"] = cache.data.shape[1]
        report(length, args.concurrency, alone, one, together, work)
        del engine


def report(length: int, concurrency: int, alone: list[dict], one: dict, together: dict, work: int) -> None:
    serial = sum(r["total"] for r in alone)
    one_p99, all_p99 = pct(one["busy_itl"], 0.99), pct(together["busy_itl"], 0.99)
    print(
        f"{length:6d} tokens alone: TTFT p50 {statistics.median(r['ttft'][0] for r in alone):.2f} s, total p50 "
        f"{statistics.median(r['total'] for r in alone):.2f} s"
    )
    print(
        f"{length:6d} tokens x1 beside a running decode: TTFT {one['ttft'][0]:.2f} s; its ITL idle "
        f"{one['idle_itl'] * 1e3:.1f} ms, while the prompt prefills p50 {pct(one['busy_itl'], 0.5) * 1e3:.1f} / "
        f"p99 {one_p99 * 1e3:.1f} ms ({one_p99 / one['idle_itl']:.1f}x idle, {len(one['busy_itl'])} tokens); "
        + (
            f"decode-only steps meanwhile p50 {pct(one['decode_only'], 0.5) * 1e3:.1f} ms "
            f"(p99 {one_p99 / pct(one['decode_only'], 0.5):.1f}x that, {len(one['decode_only'])} steps)"
            if one["decode_only"]
            else "no decode-only step meanwhile"
        )
    )
    print(
        f"{length:6d} tokens x{concurrency}: total {together['total']:.2f} s vs {serial:.2f} s one after another "
        f"({together['total'] / serial:.2f}x, {together['steps']} steps); TTFT p50 "
        f"{statistics.median(together['ttft']):.2f} s, max {max(together['ttft']):.2f} s; ITL of the decoding "
        f"ones while others prefill p50 {pct(together['busy_itl'], 0.5) * 1e3:.1f} / p99 {all_p99 * 1e3:.1f} ms "
        f"({all_p99 / one['idle_itl']:.1f}x idle, {len(together['busy_itl'])} tokens)",
        flush=True,
    )
    print(
        f"{length:6d} tokens memory: the latent cache {together['cache_mib']:.0f} MiB ({together['cache_slots']} "
        f"token slots, {together['cache_kib']:.2f} KiB a token, allocated whole); peak RSS during "
        f"x{concurrency} +{together['peak_mib']:.0f} MiB over the loaded engine at {work} cached tokens "
        "(step temporaries)",
        flush=True,
    )


if __name__ == "__main__":
    main()
