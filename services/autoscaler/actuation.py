"""What every actuator does around adding and removing pools: register new pools and rebalance onto them;
drain leaving pools (re-pack their replicas onto the rest, two-phase) before they go."""

from __future__ import annotations

from services.autoscaler.rebalance import propose
from services.autoscaler.rollout import rollout
from services.state.load_store import RedisLoadStore
from services.state.placement import Placement, Pool
from services.state.placement_store import RedisPlacementStore


def planning_load(store: RedisPlacementStore, placement: Placement, window_s: float):
    load = RedisLoadStore.from_url(store.url, placement.layers, placement.num_experts).window(window_s)
    return load + 1 if load.sum() == 0 else load  # no recent load: plan for an even one


def without_pools(placement: Placement, leaving: set[str]) -> Placement:
    remaining = placement.copy()
    for pool in leaving:
        remaining.pools.pop(pool, None)
    remaining.pinned = {(l, e, p) for l, e, p in remaining.pinned if p not in leaving}
    for layer in remaining.layers:
        remaining.replicas[layer] = [[p for p in r if p not in leaving] for r in remaining.replicas[layer]]
    remaining.shares = {}  # even until the re-plan that follows sets shares for what is left
    return remaining


def add_pools(store: RedisPlacementStore, pools: list[Pool], window_s: float, grace_s: float) -> None:
    """Register serving pools (holding nothing yet), then rebalance onto them."""
    placement = store.get()
    new = placement.copy()
    for pool in pools:
        new.pools[pool.pool_id] = pool
    registered = store.publish(new, placement.version)
    rollout(
        store, propose(registered, planning_load(store, registered, window_s)).proposed, registered.version, grace_s
    )


def drain_pools(store: RedisPlacementStore, leaving: set[str], window_s: float, grace_s: float) -> None:
    """Re-pack the leaving pools' replicas onto the others and take them out of the placement."""
    placement = store.get()
    leaving = leaving & set(placement.pools)
    if leaving:
        remaining = without_pools(placement, leaving)
        rollout(
            store, propose(remaining, planning_load(store, placement, window_s)).proposed, placement.version, grace_s
        )
