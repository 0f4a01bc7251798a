"""`expertmesh load ...`: routed-token load per expert and per pool, from Redis."""

from __future__ import annotations

import json
from typing import Optional

import typer

from services.cli.admin import resolve_redis
from services.cli.output import fail

app = typer.Typer(no_args_is_help=True, help="Routed-token load per expert and pool.")


def load_report(redis_url: str, window_s: float, layer: Optional[int] = None, limit: int = 20) -> dict:
    import redis

    from services.errors import ExpertmeshError
    from services.state.load_store import RedisLoadStore
    from services.state.placement_store import RedisPlacementStore

    try:
        placement = RedisPlacementStore(redis_url).get()
    except redis.RedisError as exc:
        fail(f"cannot read {redis_url}: {exc}")
    except ExpertmeshError as exc:
        fail(f"the placement in {redis_url} is unreadable: {exc}", code=1)
    if placement is None:
        fail(f"no placement in {redis_url}: is a deployment running?")
    layers = sorted(placement.replicas)
    if layer is not None and layer not in layers:
        fail(f"layer {layer} is not an MoE layer (MoE layers: {layers[0]}..{layers[-1]})")
    num_experts = len(placement.replicas[layers[0]])
    counts = RedisLoadStore.from_url(redis_url, layers, num_experts).window(window_s)  # [layers, E]
    chosen = [layer] if layer is not None else layers
    rows = {l: counts[layers.index(l)] for l in chosen}
    per_pool_total = dict.fromkeys(sorted(placement.pools), 0.0)
    experts = []
    for l, row in rows.items():
        for p, v in placement.pool_loads(l, row).items():
            per_pool_total[p] += v
        experts += [
            {"layer": l, "expert": e, "tokens": int(t), "replicas": len(placement.pools_for(l, e))}
            for e, t in enumerate(row)
            if t
        ]
    experts.sort(key=lambda r: -r["tokens"])
    return {
        "window_s": float(window_s),
        "balancedness": placement.balancedness(rows),
        "placement_version": placement.version,
        "pools": [{"pool": p, "tokens": int(round(v))} for p, v in per_pool_total.items()],
        "experts": experts[:limit],
    }


@app.command("top")
def top(
    layer: Optional[int] = typer.Option(None, "--layer", help="One MoE layer (default: all)."),
    window: float = typer.Option(60.0, "--window", min=1.0, help="Seconds of load to sum."),
    limit: int = typer.Option(20, "--limit", min=1, help="Hottest experts to list."),
    redis_url: Optional[str] = typer.Option(None, "--redis", help="Redis URL (or EXPERTMESH_REDIS_URL)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The hottest experts and the load per pool over a window, with pool balancedness (mean / max)."""
    report = load_report(resolve_redis(redis_url), window, layer, limit)
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(
        f"window {report['window_s']:.0f} s, balancedness {report['balancedness']:.3f}, "
        f"placement version {report['placement_version']}"
    )
    for p in report["pools"]:
        typer.echo(f"  {p['pool']:12} {p['tokens']:10d} tokens")
    typer.echo("  layer expert     tokens replicas")
    for e in report["experts"]:
        typer.echo(f"  {e['layer']:5d} {e['expert']:6d} {e['tokens']:10d} {e['replicas']:8d}")
