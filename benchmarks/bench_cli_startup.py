"""Start-up time of the light client: wall time of `expertmesh generate --target` (one token) against a running
gateway, as a shell loop of calls pays it, beside the time of the same request from an open Python client.

Usage: .venv/bin/python benchmarks/bench_cli_startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRITON_INTERPRET", "1")

from services.cli.gateway_client import GatewayClient  # noqa: E402
from services.format.model_writer import write_random_model  # noqa: E402
from services.format.presets import preset_config  # noqa: E402
from tests.inprocess_deployment import InProcessDeployment  # noqa: E402

CLI = Path(sys.executable).parent / "expertmesh"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    model = Path(tempfile.mkdtemp()) / "tiny"
    write_random_model(model, preset_config("tiny"), seed=0)
    dep = InProcessDeployment(model, dispatch_dtype="fp8")
    try:
        cmd = [str(CLI), "generate", "--target", dep.gateway, "--tokens", "5,17,300", "--max-tokens", "1", "--json"]
        cli, py = [], []
        client = GatewayClient(dep.gateway)
        for _ in range(args.runs):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            cli.append(time.perf_counter() - t)
            t = time.perf_counter()
            client.generate(None, [5, 17, 300], 1)
            py.append(time.perf_counter() - t)
        print(
            f"expertmesh generate --target (1 token), {args.runs} runs: median {statistics.median(cli):.3f} s, "
            f"min {min(cli):.3f}, max {max(cli):.3f}; the same request from an open Python client: median "
            f"{statistics.median(py) * 1000:.1f} ms"
        )
    finally:
        dep.close()


if __name__ == "__main__":
    main()
