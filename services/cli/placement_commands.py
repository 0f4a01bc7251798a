"""`expertmesh placement ...`: expert placement, offline planning first."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from services.cli.admin import resolve_redis
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
    from services.errors import ExpertmeshError

    raw = read_json_file(load, "load")
    try:
        matrix = np.asarray(raw["load"], dtype=np.float64)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        fail(f'{load}: expected {{"load": [[tokens per expert] per layer]}} ({type(exc).__name__}: {exc})')
    if matrix.ndim != 2 or matrix.size == 0:
        shape = list(matrix.shape)
        fail(f'{load}: expected {{"load": [[tokens per expert] per layer]}}, got an array of shape {shape}')
    if not np.isfinite(matrix).all() or (matrix < 0).any():
        fail(f"{load}: load must be finite and non-negative token counts")
    started = time.perf_counter()
    try:
        layers = plan(matrix, pools, slots_per_pool)
    except ExpertmeshError as exc:
        fail(str(exc))
    seconds = time.perf_counter() - started
    if as_json:
        rows = [{"pools": lp.pools, "shares": lp.shares, "balancedness": lp.balancedness} for lp in layers]
        typer.echo(json.dumps({"seconds": seconds, "layers": rows}))
        return
    typer.echo(
        f"planned {len(layers)} layers x {matrix.shape[1]} experts onto {pools} pools x {slots_per_pool} slots "
        f"in {seconds:.3f} s"
    )
    for i, lp in enumerate(layers):
        replicas = sum(len(p) for p in lp.pools)
        typer.echo(
            f"layer {i:3d}: balancedness {lp.balancedness:.3f} ({lp.even_balancedness:.3f} split evenly), "
            f"{replicas} replicas, "
            f"max pool load {max(lp.pool_load):.0f} tokens"
        )


def read_json_file(path: Path, what: str):
    """The JSON in the file at `path`; a one-line error (exit 2) when it is missing, unreadable, not UTF-8 text
    or not JSON."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        fail(f"no {what} file at {path}")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        fail(f"{path}: not a {what} file (not UTF-8 text; expected JSON)")
    except json.JSONDecodeError as exc:
        fail(f"{path}: not valid JSON: {exc}")


def _store(redis_url: Optional[str]):
    from services.state.placement_store import RedisPlacementStore

    return RedisPlacementStore(resolve_redis(redis_url))


def current_placement(redis_url: Optional[str]):
    """(store, placement) of the deployment; a clear error when there is none."""
    import redis

    from services.errors import ExpertmeshError

    store = _store(redis_url)
    try:
        placement = store.get()
    except redis.RedisError as exc:
        fail(f"cannot read {store.url}: {exc}")
    except ExpertmeshError as exc:
        fail(f"the placement in {store.url} is unreadable: {exc}", code=1)
    if placement is None:
        fail(f"no placement in {store.url}: is a deployment running?")
    return store, placement


def publish(store, new, expected_version: int):
    """Store a placement change that needs no rollout (pins, a new empty pool): compare-and-set on the version."""
    import redis

    from services.errors import ExpertmeshError

    try:
        return store.publish(new, expected_version)
    except ExpertmeshError as exc:  # lost the compare-and-set: someone else changed the placement
        fail(str(exc), code=1)
    except redis.RedisError as exc:
        fail(f"cannot write {store.url}: {exc}", code=1)


def apply_placement(store, new, expected_version: int, dry_run: bool, as_json: bool, what: str) -> None:
    """Validate, then roll out in two phases (or only report with --dry-run)."""
    from services.autoscaler.rollout import diff, rollout
    from services.errors import ExpertmeshError

    old = store.get()
    try:
        new.validate(old.layers, old.num_experts)
    except ExpertmeshError as exc:
        fail(str(exc))
    gains, losses = diff(old, new)
    summary = {
        "what": what,
        "from_version": old.version,
        "loads": sum(map(len, gains.values())),
        "unloads": sum(map(len, losses.values())),
        "dry_run": dry_run,
    }
    if not dry_run:
        try:
            result = rollout(store, new, expected_version)
        except ExpertmeshError as exc:
            fail(str(exc), code=1)
        summary.update(version=result.version, seconds=result.seconds)
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        verb = "would load" if dry_run else "loaded"
        tail = "" if dry_run else f"; placement version {summary['version']} in {summary['seconds']:.2f} s"
        typer.echo(f"{what}: {verb} {summary['loads']} replicas, drop {summary['unloads']}{tail}")


def _check_ref(placement, layer: int, expert: int, pool: Optional[str] = None) -> None:
    if layer not in placement.replicas:
        fail(f"layer {layer} is not an MoE layer (MoE layers: {placement.layers[0]}..{placement.layers[-1]})")
    if not 0 <= expert < placement.num_experts:
        fail(f"expert {expert} out of range [0, {placement.num_experts})")
    if pool is not None and pool not in placement.pools:
        fail(f"unknown pool {pool!r} (pools: {', '.join(sorted(placement.pools))})")


RedisOption = typer.Option(
    None, "--redis", help="Redis URL (or EXPERTMESH_REDIS_URL; default: the last `expertmesh up`)."
)


@app.command("show")
def show(
    layer: Optional[int] = typer.Option(None, "--layer"),
    redis_url: Optional[str] = RedisOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The current placement: pools and, per layer, each expert's replicas."""
    _, placement = current_placement(redis_url)
    if layer is not None:
        _check_ref(placement, layer, 0)
    layers = [layer] if layer is not None else placement.layers
    if as_json:
        data = json.loads(placement.to_json())
        data["layers"] = {str(l): placement.replicas[l] for l in layers}
        if "shares" in data:
            data["shares"] = {l: shares for l, shares in data["shares"].items() if int(l) in layers}
        typer.echo(json.dumps(data))
        return
    typer.echo(f"placement version {placement.version}, {len(placement.pools)} pools")
    for p in sorted(placement.pools):
        used = max(sum(p in r for r in placement.replicas[l]) for l in placement.layers)
        slots = placement.pools[p].slots or "-"
        typer.echo(f"  {p:12} {placement.pools[p].address:22} slots {used}/{slots}")
    for l in layers:
        typer.echo(f"layer {l}:")
        for e, pools in enumerate(placement.replicas[l]):
            pins = [p for p in pools if (l, e, p) in placement.pinned]
            shares = placement.shares.get(l, {}).get(e)
            typer.echo(
                f"  expert {e:4d}: {', '.join(pools)}"
                + (f"  (shares: {', '.join(f'{x:.3f}' for x in shares)})" if shares else "")
                + (f"  (pinned: {', '.join(pins)})" if pins else "")
            )


@app.command("export")
def export(file: Path = typer.Argument(...), redis_url: Optional[str] = RedisOption) -> None:
    """Write the current placement to a JSON file (edit it, then `placement apply`)."""
    _, placement = current_placement(redis_url)
    try:
        file.write_text(placement.to_json() + "\n")
    except OSError as exc:
        fail(f"cannot write {file}: {exc.strerror or exc}")
    typer.echo(f"wrote placement version {placement.version} to {file}")


@app.command("apply")
def apply(
    file: Path = typer.Argument(...),
    dry_run: bool = typer.Option(False, "--dry-run"),
    redis_url: Optional[str] = RedisOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Roll out a placement from a file (validated: every expert keeps a replica, budgets hold, pools exist)."""
    new = read_placement_file(file)
    store, placement = current_placement(redis_url)
    unknown = [p for p in new.pools if p not in placement.pools]
    if unknown:
        fail(f"{file}: pool {unknown[0]!r} is not part of the deployment")
    apply_placement(store, new, placement.version, dry_run, as_json, f"apply {file}")


_POOL_KEYS = ("pool_id", "address")


def read_placement_file(file: Path):
    """The placement in `file` (as `placement export` writes it); a one-line error naming the file, else."""
    from services.errors import ExpertmeshError
    from services.state.placement import Placement

    raw = read_json_file(file, "placement")
    if not (isinstance(raw, dict) and isinstance(raw.get("pools"), list) and isinstance(raw.get("layers"), dict)):
        fail(
            f'{file}: not a placement: expected a JSON object with "version", "pools" (a list) and "layers" '
            "(an object), as `placement export` writes"
        )
    for i, pool in enumerate(raw["pools"]):
        if not (isinstance(pool, dict) and all(isinstance(pool.get(k), str) and pool[k] for k in _POOL_KEYS)):
            fail(f'{file}: pools[{i}] is not an object with "pool_id" and "address" strings')
    try:
        return Placement.from_json(json.dumps(raw))
    except ExpertmeshError as exc:
        fail(f"{file}: {exc}")
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        fail(f"{file}: malformed placement: {type(exc).__name__}: {exc}")


@app.command("replicate")
def replicate(
    layer: int = typer.Option(..., "--layer"),
    expert: int = typer.Option(..., "--expert"),
    pool: str = typer.Option(..., "--pool"),
    dry_run: bool = typer.Option(False, "--dry-run"),
    redis_url: Optional[str] = RedisOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Add a replica of one expert on a pool."""
    store, placement = current_placement(redis_url)
    _check_ref(placement, layer, expert, pool)
    if pool in placement.replicas[layer][expert]:
        fail(f"{pool} already holds layer {layer} expert {expert}")
    new = placement.copy()
    new.replicas[layer][expert].append(pool)
    new.reset_shares(layer, expert)
    what = f"replicate layer {layer} expert {expert} on {pool}"
    apply_placement(store, new, placement.version, dry_run, as_json, what)


@app.command("move")
def move(
    layer: int = typer.Option(..., "--layer"),
    expert: int = typer.Option(..., "--expert"),
    from_pool: str = typer.Option(..., "--from"),
    to_pool: str = typer.Option(..., "--to"),
    dry_run: bool = typer.Option(False, "--dry-run"),
    redis_url: Optional[str] = RedisOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Move one replica of an expert from one pool to another."""
    store, placement = current_placement(redis_url)
    _check_ref(placement, layer, expert, from_pool)
    _check_ref(placement, layer, expert, to_pool)
    replicas = placement.replicas[layer][expert]
    if from_pool not in replicas:
        fail(f"{from_pool} holds no replica of layer {layer} expert {expert}")
    if to_pool in replicas:
        fail(f"{to_pool} already holds layer {layer} expert {expert}")
    if (layer, expert, from_pool) in placement.pinned:
        fail(f"the replica on {from_pool} is pinned: unpin it first")
    new = placement.copy()
    new.replicas[layer][expert] = [to_pool if p == from_pool else p for p in replicas]
    what = f"move layer {layer} expert {expert} {from_pool} -> {to_pool}"
    apply_placement(store, new, placement.version, dry_run, as_json, what)


def _pin(layer: int, expert: int, pool: str, redis_url: Optional[str], pinned: bool) -> None:
    store, placement = current_placement(redis_url)
    _check_ref(placement, layer, expert, pool)
    if pool not in placement.replicas[layer][expert]:
        fail(f"{pool} holds no replica of layer {layer} expert {expert}")
    new = placement.copy()
    (new.pinned.add if pinned else new.pinned.discard)((layer, expert, pool))
    published = publish(store, new, placement.version)
    verb = "pinned" if pinned else "unpinned"
    typer.echo(f"{verb} layer {layer} expert {expert} on {pool} (version {published.version})")


@app.command("pin")
def pin(
    layer: int = typer.Option(..., "--layer"),
    expert: int = typer.Option(..., "--expert"),
    pool: str = typer.Option(..., "--pool"),
    redis_url: Optional[str] = RedisOption,
) -> None:
    """Pin a replica: rebalancing keeps it where it is."""
    _pin(layer, expert, pool, redis_url, True)


@app.command("unpin")
def unpin(
    layer: int = typer.Option(..., "--layer"),
    expert: int = typer.Option(..., "--expert"),
    pool: str = typer.Option(..., "--pool"),
    redis_url: Optional[str] = RedisOption,
) -> None:
    """Let rebalancing move a pinned replica again."""
    _pin(layer, expert, pool, redis_url, False)


# a plan that loads nothing is still rolled out when its replica shares alone raise balancedness by this much
SHARES_MIN_GAIN = 1e-3


def rebalance(
    dry_run: bool = typer.Option(False, "--dry-run"),
    window: float = typer.Option(60.0, "--window", min=1.0, help="Seconds of load to plan for."),
    redis_url: Optional[str] = RedisOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Plan a placement for the recent load and roll it out: the moves, and balancedness before and after."""
    from services.autoscaler.rebalance import propose
    from services.state.load_store import RedisLoadStore

    store, placement = current_placement(redis_url)
    load = RedisLoadStore.from_url(store.url, placement.layers, placement.num_experts).window(window)
    proposal = propose(placement, load)
    if not as_json:
        typer.echo(
            f"balancedness {proposal.balancedness_before:.3f} -> {proposal.balancedness_after:.3f}, "
            f"{proposal.moves} replicas to load"
        )
    if as_json and dry_run:
        typer.echo(
            json.dumps(
                {
                    "balancedness_before": proposal.balancedness_before,
                    "moves": proposal.moves,
                    "balancedness_after": proposal.balancedness_after,
                    "dry_run": True,
                }
            )
        )
        return
    if proposal.moves == 0 and proposal.balancedness_after <= proposal.balancedness_before + SHARES_MIN_GAIN:
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "balancedness_before": proposal.balancedness_before,
                        "moves": 0,
                        "balancedness_after": proposal.balancedness_after,
                        "dry_run": dry_run,
                    }
                )
            )
        return
    apply_placement(store, proposal.proposed, placement.version, dry_run, as_json, "rebalance")
