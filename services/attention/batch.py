"""One forward step's batch: several sequences, each with a chunk of new tokens at its own positions.

Tokens are packed flat ([T]) for everything that is per token (projections, router, experts); attention
unpacks them into a padded [B, S] view over each sequence's keys [B, L]. Prefill chunks and decode tokens
of different sequences mix freely. Built once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.attention.kv_cache import PagedLatentCache, SequenceBlocks


@dataclass
class SequenceChunk:
    seq: SequenceBlocks
    token_ids: list[int]  # new tokens; their positions are seq.length, seq.length + 1, ...


@dataclass
class StepBatch:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slots: torch.Tensor  # [T] flat cache slots the new tokens are written to
    query_index: torch.Tensor  # [B, S] index into the flat tokens (padding points at token 0)
    query_valid: torch.Tensor  # [B, S] bool
    key_slots: torch.Tensor  # [B, L] cache slots of each sequence's keys (padding points at slot 0)
    attn_mask: torch.Tensor  # [B, S, L] bool: key visible to query (causal, within the sequence)
    last_index: torch.Tensor  # [B] flat index of each sequence's last new token
    seq_starts: list[int]  # flat offset of each sequence's chunk

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @classmethod
    def build(cls, chunks: list[SequenceChunk], cache: PagedLatentCache) -> "StepBatch":
        """Reserves cache blocks for the new tokens and advances each sequence's length."""
        if not chunks:
            raise ValueError("empty step")
        b = len(chunks)
        s_max = max(len(c.token_ids) for c in chunks)
        ends = [c.seq.length + len(c.token_ids) for c in chunks]
        l_max = max(ends)
        token_ids, positions, slots, seq_starts = [], [], [], []
        query_index = torch.zeros(b, s_max, dtype=torch.int64)
        query_valid = torch.zeros(b, s_max, dtype=torch.bool)
        key_slots = torch.zeros(b, l_max, dtype=torch.int64)
        query_pos = torch.full((b, s_max), -1, dtype=torch.int64)
        offset = 0
        for i, chunk in enumerate(chunks):
            n, start = len(chunk.token_ids), chunk.seq.length
            if n == 0:
                raise ValueError("a sequence in the step has no new tokens")
            cache.reserve(chunk.seq, n)
            seq_starts.append(offset)
            token_ids.extend(chunk.token_ids)
            positions.append(torch.arange(start, start + n))
            slots.append(cache.slots(chunk.seq, start, n))
            query_index[i, :n] = torch.arange(offset, offset + n)
            query_valid[i, :n] = True
            query_pos[i, :n] = torch.arange(start, start + n)
            key_slots[i, : ends[i]] = cache.slots(chunk.seq, 0, ends[i])
            chunk.seq.length = ends[i]
            offset += n
        key_pos = torch.arange(l_max)
        attn_mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, S, L]
        attn_mask[:, :, 0] |= ~query_valid  # padded queries see one key: no all-masked rows
        return cls(
            token_ids=torch.tensor(token_ids, dtype=torch.int64),
            positions=torch.cat(positions),
            slots=torch.cat(slots),
            query_index=query_index,
            query_valid=query_valid,
            key_slots=key_slots,
            attn_mask=attn_mask,
            last_index=torch.tensor([s + len(c.token_ids) - 1 for s, c in zip(seq_starts, chunks)]),
            seq_starts=seq_starts,
        )

    def to(self, device: torch.device | str) -> "StepBatch":
        for name in ("token_ids", "positions", "slots", "query_index", "query_valid", "key_slots", "attn_mask", "last_index"):
            setattr(self, name, getattr(self, name).to(device))
        return self
