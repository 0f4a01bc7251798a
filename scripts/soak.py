"""Soak (RELIABILITY.md): `expertmesh up` under mixed load for D seconds: generate of random lengths, some
sampled, some cancelled mid-stream (the client hangs up), score calls, and OpenAI HTTP completions. Samples every
process's memory (RSS), threads and open file descriptors after a warm-up and at the end, and the gateway's
cache usage once idle. Prints the growth of each and exits 1 when a bound is passed.

Usage: .venv/bin/python scripts/soak.py [--duration 600] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.simplefilter("ignore")

from expertmesh.v1 import gateway_pb2  # noqa: E402
from services.cli.gateway_client import GatewayClient  # noqa: E402
from services.format.model_writer import write_random_model  # noqa: E402
from services.format.presets import preset_config  # noqa: E402
from tests.local_deployment import UpProcess, metric  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

RSS_GROWTH_BOUND_MIB = 64  # per process, warm-up to end
FD_GROWTH_BOUND = 16
THREAD_GROWTH_BOUND = 8


def proc_sample(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    field = {line.split(":")[0]: line.split(":")[1].split() for line in status}
    return {
        "rss_mib": int(field["VmRSS"][0]) / 1024,
        "threads": int(field["Threads"][0]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def one_request(client: GatewayClient, http: str, rng: random.Random) -> str:
    kind = rng.choice(["greedy", "sampled", "cancel", "score", "http"])
    prompt = [rng.randrange(2, 1000) for _ in range(rng.randrange(1, 200))]
    if kind == "greedy":
        client.generate(None, prompt, rng.randrange(1, 64), ignore_eos=True)
    elif kind == "sampled":
        client.generate(None, prompt, rng.randrange(1, 64), temperature=0.8, top_p=0.9, seed=rng.randrange(1000))
    elif kind == "cancel":
        stream = client.stub.Generate(
            gateway_pb2.GenerateRequest(
                token_ids=prompt, sampling=gateway_pb2.SamplingParams(max_tokens=500, ignore_eos=True)
            ),
            timeout=60,
        )
        for i, _ in enumerate(stream):
            if i == rng.randrange(1, 6):
                stream.cancel()
                break
    elif kind == "score":
        client.score(None, prompt, rng.randrange(0, 5))
    else:
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": rng.randrange(1, 32), "temperature": 0})
        req = urllib.request.Request(f"{http}/completions", body.encode(), {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=60).read()
    return kind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp())
    model = home / "tiny"
    write_random_model(model, preset_config("tiny"), seed=0)
    up = UpProcess(model, pools=2, dispatch="fp8", home=home / "home", autoscale=True)
    counts: dict[str, int] = {}
    errors: list[str] = []
    stop = threading.Event()

    def worker(seed: int) -> None:
        client, rng = GatewayClient(up.gateway, timeout_s=60), random.Random(seed)
        while not stop.is_set():
            try:
                kind = one_request(client, up.http, rng)
                counts[kind] = counts.get(kind, 0) + 1
            except Exception as exc:  # noqa: BLE001 - counted
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    try:
        pids = {name: pid for name, pid in _children(up).items()}
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.concurrency)]
        for t in threads:
            t.start()
        time.sleep(min(60.0, args.duration / 4))  # warm-up: caches, thread pools and allocators settle
        start = {name: proc_sample(pid) for name, pid in pids.items()}
        time.sleep(args.duration / 2)
        middle = {name: proc_sample(pid) for name, pid in pids.items()}
        time.sleep(args.duration / 2)
        stop.set()
        for t in threads:
            t.join(120)
        gateway_metrics = up.metrics_url("gateway")
        idle = wait_until(
            lambda: (
                metric(gateway_metrics, "kv_cache_usage_perc") == 0.0
                and metric(gateway_metrics, "num_requests_running") == 0.0
            ),
            60,
            "the gateway to be idle",
        )
        end = {name: proc_sample(pid) for name, pid in pids.items()}
    finally:
        up.stop()
    print(
        f"soak: {args.duration:.0f} s after a warm-up, {args.concurrency} clients, mixed load: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; {len(errors)} failed"
    )
    failed = bool(errors) or not idle
    print(
        f"  bounds, the second half of the run: RSS +{RSS_GROWTH_BOUND_MIB} MiB, threads +{THREAD_GROWTH_BOUND}, "
        f"fds +{FD_GROWTH_BOUND} per process"
    )
    for name in sorted(start):
        a, m, b = start[name], middle[name], end[name]
        growth = (b["rss_mib"] - m["rss_mib"], b["threads"] - m["threads"], b["fds"] - m["fds"])
        bad = growth[0] > RSS_GROWTH_BOUND_MIB or growth[1] > THREAD_GROWTH_BOUND or growth[2] > FD_GROWTH_BOUND
        failed |= bad
        print(
            f"  {name:10} RSS {a['rss_mib']:.0f} -> {m['rss_mib']:.0f} -> {b['rss_mib']:.0f} MiB, threads "
            f"{a['threads']} -> {m['threads']} -> {b['threads']}, fds {a['fds']} -> {m['fds']} -> {b['fds']}"
            + ("  OVER BOUND" if bad else "")
        )
    print(f"  gateway cache usage and running requests back to 0 when idle: {bool(idle)}")
    for err in sorted(set(errors))[:5]:
        print("  error:", err)
    sys.exit(1 if failed else 0)


def _children(up: UpProcess) -> dict[str, int]:
    names = {}
    for pid in up.child_pids():
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "services.gateway" in cmd:
            names["gateway"] = pid
        elif "services.expert" in cmd:
            names[cmd.split("--pool-id ")[1].split()[0]] = pid
        elif "services.autoscaler" in cmd:
            names["autoscaler"] = pid
        elif "redis-server" in cmd:
            names["redis"] = pid
    return names


if __name__ == "__main__":
    main()
