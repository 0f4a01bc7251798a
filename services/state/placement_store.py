"""Where placements live: Redis, as the source of truth (versioned, compare-and-set), read by gateways and pools.

Keys (one hash slot, so scripts and transactions work on Redis Cluster too):
  expertmesh:{placement}:version  -> the current version (int)
  expertmesh:{placement}:current  -> the placement JSON of that version
  expertmesh:{placement}:events   -> pub/sub channel, the new version: a wake-up only, readers re-read the keys
"""

from __future__ import annotations

import redis

from services.errors import InvalidRequestError
from services.state.placement import Placement

VERSION_KEY = "expertmesh:{placement}:version"
CURRENT_KEY = "expertmesh:{placement}:current"
EVENTS_CHANNEL = "expertmesh:{placement}:events"


class StalePlacementError(InvalidRequestError):
    """A compare-and-set lost: someone published another version first."""


class RedisPlacementStore:
    def __init__(self, url: str):
        self.url = url
        self.redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    def version(self) -> int:
        v = self.redis.get(VERSION_KEY)
        return int(v) if v is not None else 0

    def get(self) -> Placement | None:
        text = self.redis.get(CURRENT_KEY)
        return Placement.from_json(text.decode()) if text is not None else None

    def publish(self, placement: Placement, expected_version: int | None = None) -> Placement:
        """Store `placement` as version expected+1 (expected defaults to the current one), atomically."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.watch(VERSION_KEY)
            current = pipe.get(VERSION_KEY)
            current = int(current) if current is not None else 0
            if expected_version is not None and current != expected_version:
                raise StalePlacementError(f"placement version is {current}, not {expected_version}")
            placement.version = current + 1
            pipe.multi()
            pipe.set(CURRENT_KEY, placement.to_json())
            pipe.set(VERSION_KEY, placement.version)
            pipe.publish(EVENTS_CHANNEL, placement.version)
            try:
                pipe.execute()
            except redis.WatchError as exc:
                raise StalePlacementError("placement changed during the update") from exc
        return placement

    def close(self) -> None:
        self.redis.close()


def load_placement(redis_url: str | None, path: str | None) -> Placement:
    """The placement a service starts with: from Redis when given a URL, else from a JSON file."""
    if redis_url:
        placement = RedisPlacementStore(redis_url).get()
        if placement is None:
            raise InvalidRequestError(f"no placement stored in {redis_url}")
        return placement
    if path:
        return Placement.load(path)
    raise InvalidRequestError("give a Redis URL or a placement file")
