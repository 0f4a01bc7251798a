"""`expertmesh up`: the whole platform as local processes — Redis, N expert pools, one gateway, the autoscaler.

Gateway and autoscaler settings are GatewayConfig's and AutoscalerConfig's fields, under the same flag names
and defaults as the services' own flags and the chart's values. Stops everything on Ctrl-C or SIGTERM, or
when the gateway or Redis dies, front to back (see up_processes.py). A dead pool is reported and the rest keep
serving. Each run logs into a folder of its own; the endpoints go to up.json, removed at stop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

import typer

from services.autoscaler.config import AutoscalerConfig
from services.cli.local_state import UP_STATE, state_dir
from services.cli.output import fail
from services.cli.up_processes import Deployment, start_redis
from services.cli.up_supervisor import Supervisor
from services.gateway.config import GatewayConfig
from services.rpc.health import wait_serving
from services.rpc.processes import free_port
from services.settings import to_argv

_G, _A = GatewayConfig(), AutoscalerConfig()


def _help(cls, name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


@dataclasses.dataclass
class LocalLayout:
    """What only `up` decides: how many pools, how the experts spread at first, how long to wait."""

    pools: int
    replicas_per_expert: int
    slots_per_pool: int
    start_timeout_s: float
    autoscale: bool
    pool_threads: int  # torch threads per pool (0: the pools share half the cores)


def up(
    model: Path = typer.Option(
        None, "--model", help="Model directory (default: the tiny preset, made once in the cache)."
    ),
    pools: int = typer.Option(2, "--pools", min=1, help="Expert-pool processes."),
    replicas_per_expert: int = typer.Option(
        1, "--replicas-per-expert", min=1, help="Copies of every expert, on distinct pools."
    ),
    slots_per_pool: int = typer.Option(
        0, "--slots-per-pool", min=0, help="Experts a pool may hold per layer (0: 25% more than the initial share)."
    ),
    grpc_port: int = typer.Option(
        _G.grpc_port, "--grpc-port", min=0, max=65535, help=_help(GatewayConfig, "grpc_port")
    ),
    http_port: int = typer.Option(
        _G.http_port, "--http-port", min=-1, max=65535, help=_help(GatewayConfig, "http_port")
    ),
    redis_url: str = typer.Option(None, "--redis", help="Redis URL (default: start a private redis-server)."),
    dispatch_dtype: str = typer.Option(
        _G.dispatch_dtype, "--dispatch-dtype", help=_help(GatewayConfig, "dispatch_dtype")
    ),
    cache_tokens: int = typer.Option(
        _G.cache_tokens, "--cache-tokens", min=1, help=_help(GatewayConfig, "cache_tokens")
    ),
    prefix_caching: bool = typer.Option(
        _G.prefix_caching, "--prefix-caching/--no-prefix-caching", help=_help(GatewayConfig, "prefix_caching")
    ),
    max_step_tokens: int = typer.Option(
        _G.max_step_tokens, "--max-step-tokens", min=1, help=_help(GatewayConfig, "max_step_tokens")
    ),
    max_decode_stall: float = typer.Option(
        _G.max_decode_stall, "--max-decode-stall", min=0.0, help=_help(GatewayConfig, "max_decode_stall")
    ),
    max_running: int = typer.Option(_G.max_running, "--max-running", min=1, help=_help(GatewayConfig, "max_running")),
    max_waiting: int = typer.Option(_G.max_waiting, "--max-waiting", min=1, help=_help(GatewayConfig, "max_waiting")),
    micro_batches: int = typer.Option(
        _G.micro_batches, "--micro-batches", min=1, help=_help(GatewayConfig, "micro_batches")
    ),
    pool_transport: str = typer.Option(
        _G.pool_transport, "--pool-transport", help=_help(GatewayConfig, "pool_transport")
    ),
    fewest_pools_max_tokens: int = typer.Option(
        _G.fewest_pools_max_tokens,
        "--fewest-pools-max-tokens",
        min=0,
        help=_help(GatewayConfig, "fewest_pools_max_tokens"),
    ),
    drain_timeout_s: float = typer.Option(
        _G.drain_timeout_s, "--drain-timeout-s", min=0.0, help=_help(GatewayConfig, "drain_timeout_s")
    ),
    start_timeout_s: float = typer.Option(
        300.0, "--start-timeout-s", help="Seconds to wait for every service to serve."
    ),
    autoscale: bool = typer.Option(
        True, "--autoscale/--no-autoscale", help="Run the autoscaler (rebalancing, failover re-placement)."
    ),
    rebalance_threshold: float = typer.Option(
        _A.rebalance_threshold, "--rebalance-threshold", help=_help(AutoscalerConfig, "rebalance_threshold")
    ),
    rebalance_min_interval_s: float = typer.Option(
        _A.rebalance_min_interval_s,
        "--rebalance-min-interval-s",
        help=_help(AutoscalerConfig, "rebalance_min_interval_s"),
    ),
    autoscale_interval_s: float = typer.Option(
        _A.autoscale_interval_s, "--autoscale-interval-s", help=_help(AutoscalerConfig, "autoscale_interval_s")
    ),
    load_window_s: float = typer.Option(
        _A.load_window_s, "--load-window-s", help=_help(AutoscalerConfig, "load_window_s")
    ),
    pool_capacity: float = typer.Option(
        _A.pool_capacity, "--pool-capacity", min=0.0, help=_help(AutoscalerConfig, "pool_capacity")
    ),
    tls_dir: Path = typer.Option(None, "--tls-dir", help=_help(GatewayConfig, "tls_dir") + " Every service uses it."),
    max_pools: int = typer.Option(8, "--max-pools", min=1, help=_help(AutoscalerConfig, "max_pools")),
    device: str = typer.Option(_G.device, "--device", help=_help(GatewayConfig, "device") + " The pools too."),
    mtp: bool = typer.Option(_G.mtp, "--mtp/--no-mtp", help=_help(GatewayConfig, "mtp")),
    num_speculative_tokens: int = typer.Option(
        _G.num_speculative_tokens, "--num-speculative-tokens", help=_help(GatewayConfig, "num_speculative_tokens")
    ),
    mtp_max_batch: int = typer.Option(_G.mtp_max_batch, "--mtp-max-batch", help=_help(GatewayConfig, "mtp_max_batch")),
    threads: int = typer.Option(
        _G.threads, "--threads", min=0, help="The gateway's torch threads (0 here: half the machine's cores)."
    ),
    burst_threads: int = typer.Option(
        _G.burst_threads,
        "--burst-threads",
        min=0,
        help=_help(GatewayConfig, "burst_threads").replace("(0: --threads)", "(0 here: all the machine's cores)"),
    ),
    pool_threads: int = typer.Option(
        0, "--pool-threads", min=0, help="Each pool's torch threads (0: the pools share the other half of the cores)."
    ),
) -> None:
    """Run the platform locally: Redis, N expert pools and the gateway, until Ctrl-C or SIGTERM."""
    home = state_dir()
    if tls_dir is not None:
        from services.errors import ExpertmeshError
        from services.rpc import tls

        try:
            tls.configure(tls_dir.resolve())  # this process (health checks) and, through the environment, its children
        except ExpertmeshError as exc:
            fail(str(exc))
    model = _model_or_default(model, home)
    grpc_port = _port_or_free(grpc_port, "--grpc-port")
    if http_port >= 0:
        http_port = _port_or_free(http_port, "--http-port")
    try:
        gateway = GatewayConfig(
            model=model,
            redis=redis_url,
            grpc_port=grpc_port,
            http_port=http_port,
            dispatch_dtype=dispatch_dtype,
            device=_checked_device(device),
            mtp=mtp,
            num_speculative_tokens=num_speculative_tokens,
            mtp_max_batch=mtp_max_batch,
            cache_tokens=cache_tokens,
            prefix_caching=prefix_caching,
            max_step_tokens=max_step_tokens,
            max_decode_stall=max_decode_stall,
            max_running=max_running,
            max_waiting=max_waiting,
            micro_batches=micro_batches,
            pool_transport=pool_transport,
            fewest_pools_max_tokens=fewest_pools_max_tokens,
            drain_timeout_s=drain_timeout_s,
            threads=threads,
            burst_threads=burst_threads,
        )
        autoscaler = AutoscalerConfig(
            autoscale_interval_s=autoscale_interval_s,
            load_window_s=load_window_s,
            rebalance_threshold=rebalance_threshold,
            pool_capacity=pool_capacity,
            rebalance_min_interval_s=rebalance_min_interval_s,
            max_pools=max_pools,
        )
    except ValueError as exc:
        fail(str(exc))
    if redis_url:
        from services.cli.admin import RedisUnreachableError, check_redis

        try:
            check_redis(redis_url)
        except RedisUnreachableError as exc:
            fail(str(exc))
    layout = LocalLayout(pools, replicas_per_expert, slots_per_pool, start_timeout_s, autoscale, pool_threads)
    logs = home / "logs" / f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    run_deployment(home, Deployment(logs, gateway_drain_s=drain_timeout_s), layout, gateway, autoscaler)


def _checked_device(device: str) -> str:
    """A missing GPU (--device cuda) is refused before anything starts; auto and cpu cannot fail."""
    if device == "cuda":
        from services.math.device import DeviceUnavailableError, resolve_device

        try:
            resolve_device(device)
        except DeviceUnavailableError as exc:
            fail(str(exc))
    return device


def _model_or_default(model: Path | None, home: Path) -> Path:
    if model is not None:
        return model
    model = home / "models" / "tiny"
    if not (model / "config.json").exists():
        from services.format.model_writer import write_random_model
        from services.format.presets import preset_config

        write_random_model(model, preset_config("tiny"), seed=0)
    return model


def _port_or_free(port: int, flag: str) -> int:
    """The port a flag asks for (0: any free one), refused when something already listens there."""
    if port == 0:
        return free_port()
    if _port_in_use(port):
        fail(f"port {port} is in use (pass {flag} 0 for any free port)")
    return port


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_deployment(
    home: Path, dep: Deployment, layout: LocalLayout, gateway: GatewayConfig, autoscaler: AutoscalerConfig
) -> None:
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        state = start_services(dep, layout, gateway, autoscaler)
        (home / UP_STATE).write_text(json.dumps(state, indent=2))
        _print_endpoints(state)
        Supervisor(
            dep, state["redis"], state["pools"], state["slots"], autoscaler.load_window_s, autoscaler.grace_s
        ).run(lambda: stopping)
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(f"expertmesh: error: {exc}", err=True)
        dep.stop()
        (home / UP_STATE).unlink(missing_ok=True)
        raise typer.Exit(1) from None
    finally:
        dep.stop()
    (home / UP_STATE).unlink(missing_ok=True)
    typer.echo("stopped")


def start_services(dep: Deployment, layout: LocalLayout, gateway: GatewayConfig, autoscaler: AutoscalerConfig) -> dict:
    """Redis (unless given), the first placement, the pools, the gateway, the autoscaler -> up.json's state."""
    from services.errors import ExpertmeshError

    try:
        redis_url, pool_list, version = _first_placement(dep, layout, gateway)
    except ExpertmeshError as exc:
        raise RuntimeError(str(exc)) from None
    # on one machine the gateway and the pools share the cores: by default half for the gateway, half split over
    # the pools (--threads, --pool-threads override); while no expert call is out, all of them for the gateway
    # (--burst-threads)
    cores = os.cpu_count() or 1
    gateway_threads = gateway.threads or max(1, cores // 2)
    burst_threads = gateway.burst_threads or cores
    pool_threads = layout.pool_threads or max(1, cores // (2 * layout.pools))
    metrics = {name: free_port() for name in ["gateway", *(p.pool_id for p in pool_list), "autoscaler"]}
    _spawn_pools(dep, pool_list, gateway, redis_url, pool_threads, metrics)
    gateway = dataclasses.replace(
        gateway, redis=redis_url, threads=gateway_threads, burst_threads=burst_threads, metrics_port=metrics["gateway"]
    )
    dep.spawn("gateway", [sys.executable, "-m", "services.gateway.main", *to_argv(gateway)])

    def gone() -> str | None:
        return "; ".join(f"{dep.why_dead(name)} exited while starting" for name in dep.dead()) or None

    for pool in pool_list:
        wait_serving(pool.address, layout.start_timeout_s, pool.pool_id, gone)
    address = f"127.0.0.1:{gateway.grpc_port}"
    wait_serving(address, layout.start_timeout_s, "gateway", gone)
    if layout.autoscale:
        local = ["--local-pools", "--pool-threads", str(pool_threads), "--pool-device", gateway.device]
        local += ["--log-dir", str(dep.logs)]
        dep.spawn("autoscaler", [sys.executable, "-m", "services.autoscaler.service", "--redis", redis_url,
                                 "--metrics-port", str(metrics["autoscaler"]), "--model", str(gateway.model),
                                 *local, *to_argv(autoscaler)])  # fmt: skip
    return {
        "pid": os.getpid(),
        "started": time.time(),
        "gateway": address,
        "http": f"http://127.0.0.1:{gateway.http_port}/v1" if gateway.http_port >= 0 else None,
        "redis": redis_url,
        "model": str(gateway.model),
        "dispatch_dtype": gateway.dispatch_dtype,
        "pools": {p.pool_id: p.address for p in pool_list},
        "slots": pool_list[0].slots,
        "placement_version": version,
        "logs": str(dep.logs),
        "metrics": {
            n: f"http://127.0.0.1:{port}/metrics"
            for n, port in metrics.items()
            if layout.autoscale or n != "autoscaler"
        },
    }


def _first_placement(dep: Deployment, layout: LocalLayout, gateway: GatewayConfig):
    """Redis (started unless given) holding the first placement over the pools to start -> (url, pools, version)."""
    from services.format.config import ModelConfig
    from services.state.placement import Placement, Pool, default_slots
    from services.state.placement_store import RedisPlacementStore

    cfg = ModelConfig.from_file(gateway.model)
    redis_url = gateway.redis or start_redis(dep)
    slots = layout.slots_per_pool or default_slots(cfg.n_routed_experts, layout.replicas_per_expert, layout.pools)
    pool_list = [Pool(f"pool-{i}", f"127.0.0.1:{free_port()}", slots) for i in range(layout.pools)]
    placement = Placement.spread(cfg, pool_list, replicas=layout.replicas_per_expert)
    return redis_url, pool_list, RedisPlacementStore(redis_url).publish(placement).version


def _spawn_pools(dep: Deployment, pools, gateway: GatewayConfig, redis_url: str, threads: int, metrics: dict) -> None:
    from services.expert.server import pool_argv  # imports torch: only when starting pools

    for pool in pools:
        port = int(pool.address.rsplit(":", 1)[1])
        argv = pool_argv(gateway.model, pool.pool_id, redis_url, port, threads, metrics[pool.pool_id], gateway.device)
        dep.spawn(pool.pool_id, argv)


def _print_endpoints(state: dict) -> None:
    typer.echo(f"gateway  grpc://{state['gateway']}")
    if state.get("http"):
        typer.echo(f"http     {state['http']}")
    for pool_id, address in state["pools"].items():
        typer.echo(f"{pool_id:8} grpc://{address}")
    typer.echo(f"redis    {state['redis']}")
    for name, url in state["metrics"].items():
        typer.echo(f"metrics  {name} {url}")
    typer.echo(f"logs     {state['logs']}")
    typer.echo("ready (Ctrl-C stops everything)")
    sys.stdout.flush()
