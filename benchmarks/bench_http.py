"""The OpenAI-compatible HTTP API against gRPC on the same deployment (`expertmesh up`: gateway and 2 expert
pools as real processes, fp8 dispatch, preset `small`).

  .venv/bin/python benchmarks/bench_http.py [--concurrency 32] [--new-tokens 64] [--repeats 3]

C streaming requests at once (prompt 32 token ids, greedy, EOS ignored), through gRPC (GatewayService.Generate,
one thread per request) and through HTTP (the official `openai` client, `/v1/completions` with stream: true,
one thread per request; `return_token_ids` so every token is one chunk). Decode tok/s is measured as
bench_distributed.py measures it: the tokens that arrive while all C requests are decoding (between the last
request's first token and the first request's last token), over that window; the whole run (first first
token to last token) is printed beside it. TTFT is a request's send to its first token (p50, p99 over the C
requests of a run), so it includes the wait for admission and prefill of the others. The two protocols' runs
are interleaved, best of `--repeats` each; every run's ratio is printed too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.format.model_writer import write_random_model  # noqa: E402
from services.format.presets import preset_config  # noqa: E402
from tests.local_deployment import UpProcess  # noqa: E402

PROMPT_LEN = 32


def prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(2, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(n)]


def _pick(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e3


def summarize(sent: list[float], stamps: list[list[float]]) -> dict:
    """sent: each request's send time; stamps: per request, the arrival time of each generated token."""
    first, last = min(s[0] for s in stamps), max(s[-1] for s in stamps)
    all_in, first_out = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    in_window = sum(1 for s in stamps for t in s if all_in < t <= first_out)
    ttft = [s[0] - t0 for t0, s in zip(sent, stamps)]
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return {
        "decode_tok_s": in_window / (first_out - all_in) if first_out > all_in else float("nan"),
        "whole_run_tok_s": sum(len(s) - 1 for s in stamps) / (last - first),
        "ttft_p50_ms": _pick(ttft, 0.50),
        "ttft_p99_ms": _pick(ttft, 0.99),
        "itl_p50_ms": _pick(gaps, 0.50),
        "itl_p99_ms": _pick(gaps, 0.99),
    }


GATEWAY_PID: int | None = None  # set once `up` runs: the gateway's CPU time is reported per run


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process, from /proc."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_threads(work, batch: list[list[int]]) -> dict:
    sent = [0.0] * len(batch)
    stamps: list[list[float]] = [[] for _ in batch]
    threads = [threading.Thread(target=work, args=(i, p, sent, stamps[i])) for i, p in enumerate(batch)]
    gateway0, client0 = cpu_seconds(GATEWAY_PID), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(stamps), "a request produced no tokens"
    out = summarize(sent, stamps)
    out["gateway_cpu_s"], out["client_cpu_s"] = cpu_seconds(GATEWAY_PID) - gateway0, time.process_time() - client0
    return out


def run_grpc(gateway: str, batch: list[list[int]], new_tokens: int) -> dict:
    import grpc

    from expertmesh.v1 import gateway_pb2, gateway_pb2_grpc

    channel = grpc.insecure_channel(gateway)
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)

    def one(i: int, prompt: list[int], sent: list[float], stamps: list[float]) -> None:
        request = gateway_pb2.GenerateRequest(
            token_ids=prompt, sampling=gateway_pb2.SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        )
        sent[i] = time.perf_counter()
        for msg in stub.Generate(request, timeout=600):
            now = time.perf_counter()
            stamps.extend([now] * len(msg.token_ids))

    try:
        return _run_threads(one, batch)
    finally:
        channel.close()


def run_http(base_url: str, model: str, batch: list[list[int]], new_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)

    def one(i: int, prompt: list[int], sent: list[float], stamps: list[float]) -> None:
        sent[i] = time.perf_counter()
        stream = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=new_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        for chunk in stream:
            now = time.perf_counter()
            stamps.extend([now] * len(chunk.choices[0].token_ids or ()))

    try:
        return _run_threads(one, batch)
    finally:
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--pools", type=int, default=2)
    ap.add_argument("--cache-dir", default=".cache/bench")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs per protocol")
    args = ap.parse_args()
    model = Path(args.cache_dir) / f"{args.preset}-fp8"
    if not (model / "config.json").exists():
        write_random_model(model, preset_config(args.preset), seed=0)
    vocab = preset_config(args.preset).vocab_size
    batch = prompts(args.concurrency, vocab)
    cache_tokens = args.concurrency * (PROMPT_LEN + args.new_tokens) * 2
    runs: list[tuple[dict, dict]] = []
    with tempfile.TemporaryDirectory() as home:
        up = UpProcess(model, args.pools, "fp8", Path(home), cache_tokens=cache_tokens)
        global GATEWAY_PID
        GATEWAY_PID = up.child_pid("services.gateway.main")
        try:
            run_grpc(up.gateway, batch[:4], 4)  # warm-ups
            run_http(up.http, model.name, batch[:4], 4)
            for r in range(args.repeats):  # interleaved, the first protocol alternating
                if r % 2 == 0:
                    g = run_grpc(up.gateway, batch, args.new_tokens)
                    h = run_http(up.http, model.name, batch, args.new_tokens)
                else:
                    h = run_http(up.http, model.name, batch, args.new_tokens)
                    g = run_grpc(up.gateway, batch, args.new_tokens)
                runs.append((g, h))
        finally:
            up.stop()
    best = lambda rs: max(rs, key=lambda r: r["decode_tok_s"])  # noqa: E731
    g, h = best([g for g, _ in runs]), best([h for _, h in runs])
    print(
        f"preset {args.preset}, {args.pools} pools, fp8 dispatch, {args.concurrency} concurrent streams, prompt "
        f"{PROMPT_LEN}, {args.new_tokens} new tokens, best of {args.repeats} interleaved runs"
    )
    print(
        "| protocol | decode tok/s | whole run tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | CPU s: gateway, client |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in (("gRPC", g), ("HTTP (openai client, SSE)", h)):
        print(
            f"| {name} | {r['decode_tok_s']:.1f} | {r['whole_run_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} / "
            f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['gateway_cpu_s']:.2f}, "
            f"{r['client_cpu_s']:.2f} |"
        )
    print(f"\nHTTP / gRPC decode tok/s (best of each): {h['decode_tok_s'] / g['decode_tok_s']:.2f}x")
    print(
        "every run (gRPC, HTTP decode tok/s, ratio): "
        + "; ".join(
            f"{g['decode_tok_s']:.1f}, {h['decode_tok_s']:.1f}, {h['decode_tok_s'] / g['decode_tok_s']:.2f}x"
            for g, h in runs
        )
    )
    print(
        "every run's TTFT p50 ms (gRPC, HTTP): "
        + "; ".join(f"{g['ttft_p50_ms']:.0f}, {h['ttft_p50_ms']:.0f}" for g, h in runs)
    )


if __name__ == "__main__":
    main()
