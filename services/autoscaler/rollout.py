"""Rolling out a new placement in two phases, so that no call is routed to an expert that is not loaded.

1. Every pool loads the replicas it gains (LoadExperts returns when they serve): ready for version N+1.
2. N+1 is committed in Redis (compare-and-set on N); gateways switch at their next step boundary.
3. After a grace period (gateways poll the version every 0.5 s; calls routed with N finish within their
   deadline) pools drop the replicas that N+1 no longer has. A call that still arrives for a dropped expert
   gets FAILED_PRECONDITION and the gateway re-sends it to another replica. Only while this replica still
   leads, and only the replicas the placement current by then does not want back (`still_unwanted`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from expertmesh.v1 import expert_pool_pb2, expert_pool_pb2_grpc
from services.errors import PoolUnavailableError
from services.rpc import tls
from services.rpc.grpc_server import CHANNEL_OPTIONS
from services.state.placement import Placement
from services.state.placement_store import RedisPlacementStore

DEFAULT_GRACE_S = 2.0


@dataclass
class RolloutResult:
    version: int
    loaded: int  # replicas added to pools
    unloaded: int  # replicas dropped from pools
    seconds: float


def diff(old: Placement, new: Placement) -> tuple[dict[str, set], dict[str, set]]:
    """-> (pool -> replicas it gains, pool -> replicas it loses); pools absent from `new` lose nothing here."""
    gains, losses = {}, {}
    for pool in new.pools:
        before = set(old.experts_on(pool)) if pool in old.pools else set()
        after = set(new.experts_on(pool))
        gains[pool], losses[pool] = after - before, before - after
    return gains, losses


def _call(address: str, method: str, refs: set, timeout: float) -> None:
    request_type = (
        expert_pool_pb2.LoadExpertsRequest if method == "LoadExperts" else expert_pool_pb2.UnloadExpertsRequest
    )
    request = request_type(experts=[expert_pool_pb2.ExpertRef(layer=l, expert=e) for l, e in sorted(refs)])
    with tls.channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = expert_pool_pb2_grpc.ExpertPoolServiceStub(channel)
        try:
            getattr(stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise PoolUnavailableError(address, f"{method}: {exc.code().name}: {exc.details()}") from None


def load_on_pool(address: str, refs: set, timeout_s: float = 120.0) -> None:
    """Have one pool load replicas (returns once they serve)."""
    if refs:
        _call(address, "LoadExperts", refs, timeout_s)


def still_unwanted(current: Placement | None, losses: dict[str, set], leading: bool) -> dict[str, set]:
    """What phase 3 may still unload after the grace period: nothing once this replica no longer leads (the new
    leader may be loading those very replicas for its own rollout); otherwise each pool's dropped replicas less
    those the placement now current wants there again (a later rollout may have put them back)."""
    if not leading:
        return {}
    return {
        pool: refs - (set(current.experts_on(pool)) if current is not None and pool in current.pools else set())
        for pool, refs in losses.items()
    }


def rollout(
    store: RedisPlacementStore,
    new: Placement,
    expected_version: int,
    grace_s: float = DEFAULT_GRACE_S,
    timeout_s: float = 120.0,
) -> RolloutResult:
    started = time.monotonic()
    old = store.get()
    if old is None:
        raise PoolUnavailableError("redis", "no placement to roll out from")
    new.validate(old.layers, old.num_experts)
    gains, losses = diff(old, new)
    for pool, refs in gains.items():  # phase 1
        load_on_pool(new.pools[pool].address, refs, timeout_s)
    published = store.publish(new, expected_version)  # phase 2
    time.sleep(grace_s)  # phase 3
    leadership = getattr(store, "leadership", None)
    leading = leadership is None or leadership.is_leader()
    for pool, refs in still_unwanted(store.get(), losses, leading).items():
        if refs:
            try:
                _call(new.pools[pool].address, "UnloadExperts", refs, timeout_s)
            except PoolUnavailableError:
                pass  # a pool that died meanwhile holds nothing anyway
    return RolloutResult(
        published.version, sum(map(len, gains.values())), sum(map(len, losses.values())), time.monotonic() - started
    )
