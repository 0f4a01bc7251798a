"""`expertmesh up`: the whole platform as local processes — Redis, N expert pools, one gateway.

Stops everything on Ctrl-C or SIGTERM, or when the gateway or Redis dies, front to back: the gateway first (it
refuses new requests and finishes the running ones while the pools still serve), then the autoscaler and the
pools, Redis last; each stage gets SIGTERM, then SIGKILL after its grace. A dead pool is reported and the rest
keep serving. Children also get SIGTERM if this process is killed outright (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

from services.cli.output import fail
from services.rpc.grpc_server import GRACE_SECONDS
from services.rpc.health import wait_serving
from services.rpc.processes import die_with_parent, free_port

STOP_GRACE_S = 5.0
GATEWAY_STOP_GRACE_S = GRACE_SECONDS + 2.0  # its running requests get the servers' whole grace


def stop_stage(name: str) -> int:
    """0: the gateway; 1: the autoscaler and the pools; 2: Redis."""
    return 0 if name == "gateway" else 2 if name == "redis" else 1


def state_dir() -> Path:
    base = os.environ.get("EXPERTMESH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "expertmesh")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Deployment:
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], log: Path) -> subprocess.Popen:
        out = open(log, "ab")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent)
        self.processes.append((name, proc))
        return proc

    def dead(self) -> list[str]:
        return [f"{name} (exit {p.returncode})" for name, p in self.processes if p.poll() is not None]

    def stop(self) -> None:
        for stage in sorted({stop_stage(name) for name, _ in self.processes}):
            procs = [p for name, p in self.processes if stop_stage(name) == stage]
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + (GATEWAY_STOP_GRACE_S if stage == 0 else STOP_GRACE_S)
            for p in procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _start_redis(dep: Deployment, logs: Path) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        fail("redis-server not found: install it (apt-get install redis-server) or pass --redis URL")
    port = free_port()
    dep.spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
              logs / "redis.log")
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if time.monotonic() > deadline or dep.dead():
                fail(f"redis-server did not start (see {logs / 'redis.log'})")
            time.sleep(0.05)


def up(
    model: Path = typer.Option(None, "--model", help="Model directory (default: the tiny preset, made once in the cache)."),
    pools: int = typer.Option(2, "--pools", min=1, help="Expert-pool processes."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Copies of every expert, on distinct pools."),
    slots_per_pool: int = typer.Option(0, "--slots-per-pool", min=0,
                                       help="Experts a pool may hold per layer (0: 25% more than the initial share)."),
    grpc_port: int = typer.Option(50051, "--grpc-port", help="Gateway gRPC port (0: any free port)."),
    redis_url: str = typer.Option(None, "--redis", help="Redis URL (default: start a private redis-server)."),
    dispatch_dtype: str = typer.Option("fp8", "--dispatch-dtype", help="fp8, bf16 or fp32 activations to the pools."),
    cache_tokens: int = typer.Option(32768, "--cache-tokens", help="Latent KV cache capacity of the gateway, in tokens."),
    start_timeout: float = typer.Option(300.0, "--start-timeout", help="Seconds to wait for every service to serve."),
    autoscale: bool = typer.Option(True, "--autoscale/--no-autoscale", help="Run the autoscaler (rebalancing, failover re-placement)."),
    rebalance_threshold: float = typer.Option(0.85, "--rebalance-threshold", help="Rebalance below this pool balancedness."),
    rebalance_min_interval: float = typer.Option(30.0, "--rebalance-min-interval", help="Seconds between rebalances at least."),
    autoscale_interval: float = typer.Option(5.0, "--autoscale-interval", help="Seconds between autoscaler checks."),
    load_window: float = typer.Option(30.0, "--load-window", help="Seconds of load the autoscaler plans for."),
    pool_capacity: float = typer.Option(0.0, "--pool-capacity", min=0.0,
                                        help="Routed tokens/s one pool serves at full load; >0 lets the autoscaler "
                                             "start and stop pool processes on utilisation."),
    max_pools: int = typer.Option(8, "--max-pools", min=1, help="Most pools the autoscaler may run."),
    micro_batches: int = typer.Option(1, "--micro-batches", min=1,
                                      help="Gateway micro-batches per step (attention of one overlaps the pools' work)."),
) -> None:
    """Run the platform locally: Redis, N expert pools and the gateway, until Ctrl-C or SIGTERM."""
    from services.format.config import ModelConfig
    from services.errors import ExpertmeshError
    from services.state.placement import Placement, Pool, default_slots
    from services.state.placement_store import RedisPlacementStore
    from services.expert.server import pool_argv  # imports torch: only when starting pools

    if dispatch_dtype not in ("fp8", "bf16", "fp32"):
        fail(f"--dispatch-dtype must be fp8, bf16 or fp32, got {dispatch_dtype!r}")
    home = state_dir()
    if model is None:
        model = home / "models" / "tiny"
        if not (model / "config.json").exists():
            from services.format.model_writer import write_random_model
            from services.format.presets import preset_config

            write_random_model(model, preset_config("tiny"), seed=0)
    try:
        cfg = ModelConfig.from_file(model)
    except ExpertmeshError as exc:
        fail(str(exc))
    if grpc_port:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", grpc_port)) == 0:
                fail(f"port {grpc_port} is in use (pass --grpc-port 0 for any free port)")
    else:
        grpc_port = free_port()

    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    dep = Deployment()
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        redis_url = redis_url or _start_redis(dep, logs)
        slots = slots_per_pool or default_slots(cfg.n_routed_experts, replicas, pools)
        pool_list = [Pool(f"pool-{i}", f"127.0.0.1:{free_port()}", slots) for i in range(pools)]
        try:
            placement = RedisPlacementStore(redis_url).publish(Placement.spread(cfg, pool_list, replicas=replicas))
        except ExpertmeshError as exc:
            fail(str(exc))
        py = sys.executable
        # on one machine the gateway and the pools share the cores: half for the gateway, half split over the
        # pools (measured on 2 cores: 1 thread each beats 2 for the gateway, whose idle OpenMP threads spin)
        cores = os.cpu_count() or 1
        gateway_threads, pool_threads = str(max(1, cores // 2)), str(max(1, cores // (2 * pools)))
        metrics = {name: free_port() for name in ["gateway", *(p.pool_id for p in pool_list), "autoscaler"]}
        for pool in pool_list:
            dep.spawn(pool.pool_id, pool_argv(model, pool.pool_id, redis_url, int(pool.address.rsplit(":", 1)[1]),
                                              int(pool_threads), metrics[pool.pool_id]),
                      logs / f"{pool.pool_id}.log")
        gateway = f"127.0.0.1:{grpc_port}"
        dep.spawn("gateway", [py, "-m", "services.gateway.server", "--model", str(model), "--redis", redis_url,
                              "--dispatch-dtype", dispatch_dtype, "--port", str(grpc_port), "--cache-tokens", str(cache_tokens),
                              "--threads", gateway_threads, "--micro-batches", str(micro_batches),
                              "--metrics-port", str(metrics["gateway"])],
                  logs / "gateway.log")
        def gone() -> str | None:
            return f"{', '.join(dep.dead())} exited while starting" if dep.dead() else None

        for pool in pool_list:
            wait_serving(pool.address, start_timeout, pool.pool_id, gone)
        wait_serving(gateway, start_timeout, "gateway", gone)
        if autoscale:
            dep.spawn("autoscaler", [py, "-m", "services.autoscaler.service", "--redis", redis_url,
                                     "--interval-s", str(autoscale_interval), "--threshold", str(rebalance_threshold),
                                     "--min-interval-s", str(rebalance_min_interval), "--window-s", str(load_window),
                                     "--metrics-port", str(metrics["autoscaler"]), "--model", str(model),
                                     "--local-pools", "--pool-threads", pool_threads, "--log-dir", str(logs),
                                     "--pool-capacity-tokens-s", str(pool_capacity), "--min-pools", "1",
                                     "--max-pools", str(max_pools)],
                      logs / "autoscaler.log")
        state = {"pid": os.getpid(), "gateway": gateway, "redis": redis_url, "model": str(model),
                 "dispatch_dtype": dispatch_dtype, "pools": {p.pool_id: p.address for p in pool_list},
                 "placement_version": placement.version, "logs": str(logs),
                 "metrics": {name: f"http://127.0.0.1:{port}/metrics" for name, port in metrics.items()
                             if autoscale or name != "autoscaler"}}
        (home / "up.json").write_text(json.dumps(state, indent=2))
        typer.echo(f"gateway  grpc://{gateway}")
        for p in pool_list:
            typer.echo(f"{p.pool_id:8} grpc://{p.address}")
        typer.echo(f"redis    {redis_url}")
        for name, url in state["metrics"].items():
            typer.echo(f"metrics  {name} {url}")
        typer.echo(f"logs     {logs}")
        typer.echo("ready (Ctrl-C stops everything)", err=False)
        sys.stdout.flush()
        reported: set[str] = set()
        while not stopping:
            for name, proc in dep.processes:
                if proc.poll() is None or name in reported:
                    continue
                reported.add(name)
                if name in ("gateway", "redis"):
                    typer.echo(f"expertmesh: {name} exited ({proc.returncode}); stopping", err=True)
                    stopping = True
                else:  # a pool or the autoscaler: the gateway routes around dead pools; the autoscaler re-places
                    typer.echo(f"expertmesh: {name} exited ({proc.returncode}); the others keep serving", err=True)
            time.sleep(0.2)
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(f"expertmesh: error: {exc}", err=True)
        dep.stop()
        raise typer.Exit(1)
    finally:
        dep.stop()
    typer.echo("stopped")
