"""Per-(layer, logical expert) routed-token counts in Redis, in time buckets with a TTL.

One hash per MoE layer per bucket: `expertmesh:load:{layer}:{bucket}` with field = expert id, value = tokens.
Writes are HINCRBY per touched expert plus one EXPIRE per hash, in one pipeline (one round trip); reads sum the
buckets of a window in one pipeline.

`LoadRecorder` sits on the gateway's hot path: a step only adds its counts to an in-memory matrix; a background
thread flushes at most every `flush_interval_s`. If Redis is unreachable nothing stalls or fails: counts stay
buffered (at most `max_buckets` buckets; older ones are dropped and counted), the outage is logged once and
shown in `outage_seconds`/`dropped_buckets`, and everything is flushed on reconnect.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import redis

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BUCKET_SECONDS = 5
TTL_SECONDS = 3600
KEY = "expertmesh:load:{layer}:{bucket}"


def bucket_of(t: float, bucket_s: int = BUCKET_SECONDS) -> int:
    return int(t // bucket_s)


class RedisLoadStore:
    def __init__(
        self,
        client: redis.Redis,
        layers: list[int],
        num_experts: int,
        bucket_s: int = BUCKET_SECONDS,
        ttl_s: int = TTL_SECONDS,
    ):
        self.redis = client
        self.layers = layers
        self.num_experts = num_experts
        self.bucket_s = bucket_s
        self.ttl_s = ttl_s

    @classmethod
    def from_url(cls, url: str, layers: list[int], num_experts: int, **kw) -> RedisLoadStore:
        return cls(redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0), layers, num_experts, **kw)

    def write(self, buckets: dict[int, np.ndarray]) -> None:
        """buckets: bucket -> [len(layers), E] token counts. One pipelined round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for bucket, counts in buckets.items():
            for row, layer in enumerate(self.layers):
                key = KEY.format(layer=layer, bucket=bucket)
                touched = np.flatnonzero(counts[row])
                for expert in touched:
                    pipe.hincrby(key, str(int(expert)), int(counts[row, expert]))
                if len(touched):
                    pipe.expire(key, self.ttl_s)
        pipe.execute()

    def window(self, seconds: float, now: float | None = None) -> np.ndarray:
        """Tokens per (layer, expert) over the last `seconds` -> [len(layers), E] int64."""
        now = time.time() if now is None else now
        last = bucket_of(now, self.bucket_s)
        first = bucket_of(now - seconds, self.bucket_s)
        pipe = self.redis.pipeline(transaction=False)
        for layer in self.layers:
            for bucket in range(first, last + 1):
                pipe.hgetall(KEY.format(layer=layer, bucket=bucket))
        replies = pipe.execute()
        out = np.zeros((len(self.layers), self.num_experts), dtype=np.int64)
        span = last - first + 1
        for i, reply in enumerate(replies):
            row = i // span
            for expert, tokens in reply.items():
                out[row, int(expert)] += int(tokens)
        return out


class LoadRecorder:
    def __init__(self, store: RedisLoadStore, flush_interval_s: float = 0.25, max_buckets: int = 720):
        self.store = store
        self.row_of_layer = {layer: i for i, layer in enumerate(store.layers)}
        self.flush_interval_s = flush_interval_s
        self.max_buckets = max_buckets
        self._pending: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-recorder", daemon=True)
        self.outage_since: float | None = None
        self.dropped_buckets = 0
        self.flushes = 0

    # ---- hot path (scheduler thread) -------------------------------------------------------------------
    def observe(self, layer: int, topk_idx: torch.Tensor) -> None:
        counts = topk_idx.reshape(-1).bincount(minlength=self.store.num_experts).numpy()
        bucket = bucket_of(time.time(), self.store.bucket_s)
        with self._lock:
            matrix = self._pending.get(bucket)
            if matrix is None:
                matrix = self._pending[bucket] = np.zeros((len(self.store.layers), self.store.num_experts), np.int64)
                while len(self._pending) > self.max_buckets:  # bounded: drop the oldest bucket
                    del self._pending[min(self._pending)]
                    self.dropped_buckets += 1
            matrix[self.row_of_layer[layer]] += counts

    # ---- background ------------------------------------------------------------------------------------------
    def start(self) -> LoadRecorder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()

    @property
    def outage_seconds(self) -> float:
        return 0.0 if self.outage_since is None else time.monotonic() - self.outage_since

    @property
    def buffered_buckets(self) -> int:
        return len(self._pending)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()

    def flush(self) -> bool:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return True
        try:
            self.store.write(pending)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            with self._lock:  # put the counts back, merged with what arrived meanwhile
                for bucket, matrix in pending.items():
                    if bucket in self._pending:
                        self._pending[bucket] += matrix
                    else:
                        self._pending[bucket] = matrix
                while len(self._pending) > self.max_buckets:
                    del self._pending[min(self._pending)]
                    self.dropped_buckets += 1
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                log.warning("load store unreachable (%s): buffering routed-token counts", exc)
            return False
        if self.outage_since is not None:
            log.warning(
                "load store reachable again after %.1f s: flushed %d buffered buckets",
                self.outage_seconds,
                len(pending),
            )
            self.outage_since = None
        self.flushes += 1
        return True
