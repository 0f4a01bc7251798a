"""Driving the model one step at a time without the scheduler: reserve the chunks' cache blocks, then build."""

from __future__ import annotations

from services.attention.batch import SequenceChunk, StepBatch
from services.attention.kv_cache import PagedLatentCache


def build_step(chunks: list[SequenceChunk], cache: PagedLatentCache) -> StepBatch:
    for chunk in chunks:
        cache.reserve(chunk.seq, len(chunk.token_ids))
    return StepBatch.build(chunks, cache)
