"""`expertmesh placement ...`: expert placement, offline planning first."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from services.cli.output import fail

app = typer.Typer(no_args_is_help=True, help="Show, plan and change expert placement.")


@app.command("plan")
def plan_command(
    load: Path = typer.Option(..., "--load", help='JSON file {"load": [[tokens per expert] per layer]}.'),
    pools: int = typer.Option(..., "--pools", min=1, help="Number of expert pools."),
    slots_per_pool: int = typer.Option(..., "--slots-per-pool", min=1, help="Experts each pool can hold per layer."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Run the planner offline on a load matrix: capacity planning and simulation at any scale, no cluster."""
    import numpy as np

    from services.autoscaler.planner import plan
    from services.common.errors import ExpertmeshError

    try:
        raw = json.loads(load.read_text())
        matrix = np.asarray(raw["load"], dtype=np.float64)
    except FileNotFoundError:
        fail(f"no load file at {load}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        fail(f'{load}: expected {{"load": [[tokens per expert] per layer]}} ({type(exc).__name__}: {exc})')
    started = time.perf_counter()
    try:
        layers = plan(matrix, pools, slots_per_pool)
    except ExpertmeshError as exc:
        fail(str(exc))
    seconds = time.perf_counter() - started
    if as_json:
        typer.echo(json.dumps({"seconds": seconds, "layers": [{"pools": lp.pools} for lp in layers]}))
        return
    typer.echo(f"planned {len(layers)} layers x {matrix.shape[1]} experts onto {pools} pools x {slots_per_pool} slots "
               f"in {seconds:.3f} s")
    for i, lp in enumerate(layers):
        replicas = sum(len(p) for p in lp.pools)
        typer.echo(f"layer {i:3d}: balancedness {lp.balancedness:.3f}, {replicas} replicas, "
                   f"max pool load {max(lp.pool_load):.0f} tokens")
