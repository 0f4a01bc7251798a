"""Starting `expertmesh up` as a child process and reading its endpoints (end-to-end tests, benchmarks)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


class UpProcess:
    def __init__(self, model: Path, pools: int, dispatch: str, home: Path, extra: list[str] | None = None,
                 cache_tokens: int = 8192, autoscale: bool = False):
        env = dict(os.environ, EXPERTMESH_HOME=str(home), PYTHONUNBUFFERED="1")
        self.home = home
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.app", "up", "--model", str(model), "--pools", str(pools),
             "--grpc-port", "0", "--dispatch-dtype", dispatch, "--cache-tokens", str(cache_tokens),
             "--autoscale" if autoscale else "--no-autoscale", *(extra or [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.endpoints: dict[str, str] = {}
        deadline = time.monotonic() + 180
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.match(r"(\S+)\s+(grpc://|redis://)(\S+)", line)
            if m:
                self.endpoints[m.group(1)] = m.group(3) if m.group(2) == "grpc://" else m.group(2) + m.group(3)
            if line.startswith("ready"):
                break
            if time.monotonic() > deadline:
                break
        if "gateway" not in self.endpoints:
            self.stop()
            raise RuntimeError("expertmesh up did not start:\n" + "".join(self.lines) + self.logs())

    @property
    def gateway(self) -> str:
        return self.endpoints["gateway"]

    @property
    def redis(self) -> str:
        return self.endpoints["redis"]

    def logs(self) -> str:
        out = []
        for log in sorted((self.home / "logs").glob("*.log")):
            out.append(f"--- {log.name}\n" + log.read_text()[-3000:])
        return "\n".join(out)

    def child_pids(self) -> list[int]:
        try:
            out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        except FileNotFoundError:
            return []
        return [int(x) for x in out.split()]

    def child_pid(self, pattern: str) -> int:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", pattern], capture_output=True, text=True).stdout
        return int(out.split()[0])

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
            self.lines.append(rest or "")
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode
