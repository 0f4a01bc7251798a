"""`expertmesh pools ...`: the expert pools of the deployment."""

from __future__ import annotations

import json
from typing import Optional

import typer

from services.cli.output import fail
from services.cli.placement_commands import RedisOption, apply_placement, current_placement, publish

app = typer.Typer(no_args_is_help=True, help="List and drain expert pools.")


def pool_status(address: str) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from expertmesh.v1 import expert_pool_pb2, expert_pool_pb2_grpc
    from services.rpc import tls

    with tls.channel(address) as channel:
        try:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            stub = expert_pool_pb2_grpc.ExpertPoolServiceStub(channel)
            status = stub.GetStatus(expert_pool_pb2.GetStatusRequest(), timeout=2)
        except grpc.RpcError as exc:
            return {"health": exc.code().name}
    return {
        "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
        "experts_loaded": len(status.experts),
        "seen_version": status.placement_version,
        "forward_calls": status.forward_calls,
    }


@app.command("list")
def list_pools(redis_url: Optional[str] = RedisOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """Each pool: address, health, slots used, the placement version it last served."""
    _, placement = current_placement(redis_url)
    rows = []
    for pool_id in sorted(placement.pools):
        pool = placement.pools[pool_id]
        used = max(sum(pool_id in r for r in placement.replicas[l]) for l in placement.layers)
        rows.append(
            {
                "pool": pool_id,
                "address": pool.address,
                "slots": pool.slots,
                "slots_used": used,
                **pool_status(pool.address),
            }
        )
    if as_json:
        typer.echo(json.dumps({"placement_version": placement.version, "pools": rows}))
        return
    typer.echo(f"placement version {placement.version}")
    for r in rows:
        typer.echo(
            f"  {r['pool']:12} {r['address']:22} {r['health']:12} slots {r['slots_used']}/{r['slots'] or '-'}"
            f"  version seen {r.get('seen_version', '-')}"
        )


@app.command("drain")
def drain(
    pool: str = typer.Argument(...),
    dry_run: bool = typer.Option(False, "--dry-run"),
    window: float = typer.Option(60.0, "--window", min=1.0, help="Seconds of load to plan the re-packing for."),
    redis_url: Optional[str] = RedisOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-pack every replica onto the other pools (the planner, for the recent load) and take the pool out."""
    store, placement = current_placement(redis_url)
    if pool not in placement.pools:
        fail(f"unknown pool {pool!r} (pools: {', '.join(sorted(placement.pools))})")
    others = sorted(p for p in placement.pools if p != pool)
    if not others:
        fail("cannot drain the only pool")
    from services.autoscaler.actuation import planning_load, without_pools
    from services.autoscaler.rebalance import propose
    from services.errors import ExpertmeshError

    try:  # the planner re-packs onto the rest, moving as little as it can
        new = propose(without_pools(placement, {pool}), planning_load(store, placement, window)).proposed
    except ExpertmeshError as exc:
        fail(f"cannot drain {pool}: {exc}")
    apply_placement(store, new, placement.version, dry_run, as_json, f"drain {pool}")


@app.command("add")
def add(
    address: str = typer.Argument(..., help="HOST:PORT of a running expert pool."),
    pool_id: str = typer.Option(..., "--id", help="Its pool id."),
    slots: int = typer.Option(0, "--slots", min=0, help="Experts it may hold per layer (0: as the others)."),
    redis_url: Optional[str] = RedisOption,
) -> None:
    """Register a running pool (it holds nothing yet); `expertmesh rebalance` then gives it experts."""
    from services.rpc.health import is_serving
    from services.state.placement import Pool

    store, placement = current_placement(redis_url)
    if pool_id in placement.pools:
        fail(f"pool {pool_id!r} is already in the placement")
    if not is_serving(address, timeout_s=3.0):
        fail(f"no SERVING expert pool at {address}")
    new = placement.copy()
    new.pools[pool_id] = Pool(pool_id, address, slots or min(p.slots for p in placement.pools.values()))
    published = publish(store, new, placement.version)
    typer.echo(f"added {pool_id} at {address} (placement version {published.version})")
