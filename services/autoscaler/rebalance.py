"""From a placement and a load window to a proposed placement (the planner), with its effect measured."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.autoscaler.planner import moves, plan
from services.state.placement import Placement


@dataclass
class Proposal:
    proposed: Placement
    balancedness_before: float
    balancedness_after: float
    moves: int  # replicas that pools must load


def propose(placement: Placement, load: np.ndarray) -> Proposal:
    """load [layers (placement.layers order), E] tokens -> the planner's placement over the same pools."""
    layers = placement.layers
    pool_ids = sorted(placement.pools)
    slots = min((placement.pools[p].slots or placement.num_experts) for p in pool_ids)
    current = [
        [[e for e in range(placement.num_experts) if p in placement.replicas[l][e]] for p in pool_ids] for l in layers
    ]
    index = {p: i for i, p in enumerate(pool_ids)}
    row = {l: i for i, l in enumerate(layers)}
    pinned = {(row[l], e, index[p]) for l, e, p in placement.pinned if p in index}
    plans = plan(load, len(pool_ids), slots, current=current, pinned=pinned, min_replicas=placement.min_replicas)
    proposed = placement.copy()
    for l, lp in zip(layers, plans):
        replicas = [[] for _ in range(placement.num_experts)]
        for i, experts in enumerate(lp.pools):
            for e in experts:
                replicas[e].append(pool_ids[i])
        proposed.replicas[l] = replicas  # each expert's replicas in pool order, as the plan's shares
        proposed.set_shares(l, lp.shares)
    by_layer = {l: load[i].tolist() for i, l in enumerate(layers)}
    return Proposal(
        proposed,
        placement.balancedness(by_layer),
        proposed.balancedness(by_layer),
        sum(moves(c, lp.pools) for c, lp in zip(current, plans)),
    )
