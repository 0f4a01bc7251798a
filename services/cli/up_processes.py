"""The child processes of `expertmesh up`: spawning with a log file each, stopping front to back, a private Redis.

Stop order: the gateway first (it refuses new requests and finishes the running ones while the pools still
serve), then the autoscaler and the pools, Redis last; each stage gets SIGTERM, then SIGKILL after its grace.
Children also get SIGTERM if `up` is killed outright (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.rpc.processes import die_with_parent, free_port

STOP_GRACE_S = 15.0  # pools and the autoscaler: the servers' default drain time and a little more


def stop_stage(name: str) -> int:
    """0: the gateway; 1: the autoscaler and the pools; 2: Redis."""
    return 0 if name == "gateway" else 2 if name == "redis" else 1


@dataclass
class Deployment:
    logs: Path
    gateway_drain_s: float = 60.0  # the gateway's --drain-timeout-s: its running requests get all of it
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    argv: dict[str, list[str]] = field(default_factory=dict)  # each child's command line, to restart it

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.log_of(name), "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
            )
        self.processes = [(n, p) for n, p in self.processes if n != name] + [(name, proc)]
        self.argv[name] = argv
        return proc

    def restart(self, name: str) -> subprocess.Popen:
        """The same command line again (same ports): a crashed child comes back where its clients look."""
        return self.spawn(name, self.argv[name])

    def log_of(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def dead(self) -> list[str]:
        return [name for name, p in self.processes if p.poll() is not None]

    def why_dead(self, name: str) -> str:
        """`name (exit N): <last line of its log>; log: PATH`."""
        code = next(p.returncode for n, p in self.processes if n == name)
        try:
            lines = [line for line in self.log_of(name).read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        last = f": {lines[-1].strip()}" if lines else ""
        return f"{name} (exit {code}){last}; log: {self.log_of(name)}"

    def stop(self) -> None:
        for stage in sorted({stop_stage(name) for name, _ in self.processes}):
            procs = [p for name, p in self.processes if stop_stage(name) == stage]
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + (self.gateway_drain_s + 5.0 if stage == 0 else STOP_GRACE_S)
            for p in procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def start_redis(dep: Deployment, timeout_s: float = 10.0) -> str:
    """A private redis-server on a free port of 127.0.0.1 -> its URL. Raises RuntimeError if it does not start."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: install it (apt-get install redis-server) or pass --redis URL")
    port = free_port()
    # an append-only file in the run's log folder: a restarted redis-server has the placement back
    dep.spawn(
        "redis",
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(dep.logs),
            "--appendfilename",
            "redis.aof",
        ],
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if time.monotonic() > deadline or dep.dead():
                raise RuntimeError(f"redis-server did not start (see {dep.log_of('redis')})") from None
            time.sleep(0.05)
