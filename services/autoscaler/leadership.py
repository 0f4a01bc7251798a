"""Acting only while leading: with several autoscaler replicas, one holds the lease and the others wait.

Leadership is checked right before each actuation, not once per tick: a tick can last minutes (pools loading
replicas, new pods starting), longer than a lease. `LeaderOnlyStore` refuses to publish a placement and the
Kubernetes actuator refuses to patch the StatefulSet's scale once `is_leader()` says no; the refusal is a
`NotLeaderError`, which abandons the rollout or the scaling like any other failed actuation.
"""

from __future__ import annotations

from typing import Protocol

from services.errors import ExpertmeshError
from services.state.placement import Placement
from services.state.placement_store import RedisPlacementStore


class Leadership(Protocol):
    identity: str

    def is_leader(self) -> bool: ...


class NotLeaderError(ExpertmeshError):
    """This replica does not hold the lease (any more): it must not change the placement or the pools."""

    def __init__(self, identity: str, action: str):
        super().__init__(f"{identity} is not the leader: {action} refused")


def require_leader(leadership: Leadership | None, action: str) -> None:
    if leadership is not None and not leadership.is_leader():
        raise NotLeaderError(leadership.identity, action)


class LeaderOnlyStore:
    """A placement store whose publish() goes through only while `leadership` leads; reads pass through."""

    def __init__(self, store: RedisPlacementStore, leadership: Leadership):
        self._store, self.leadership = store, leadership

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def publish(self, placement: Placement, expected_version: int | None = None) -> Placement:
        require_leader(self.leadership, "publishing a placement")
        return self._store.publish(placement, expected_version)
