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
    uniform: bool = False  # every chunk has the same length: flat [T] is exactly [B, S] (all decode steps)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @classmethod
    def build(cls, chunks: list[SequenceChunk], cache: PagedLatentCache) -> "StepBatch":
        """Advances each sequence's length by its chunk. Blocks must be reserved already (the scheduler does)."""
        if not chunks:
            raise ValueError("empty step")
        b = len(chunks)
        lengths = [len(c.token_ids) for c in chunks]
        if 0 in lengths:
            raise ValueError("a sequence in the step has no new tokens")
        starts_list = [c.seq.length for c in chunks]
        for chunk, n in zip(chunks, lengths):
            if cache.blocks_needed(chunk.seq, n):
                raise ValueError(f"a sequence needs {cache.blocks_needed(chunk.seq, n)} more cache blocks: reserve first")
            chunk.seq.length += n
        n = torch.tensor(lengths)  # [B]
        start = torch.tensor(starts_list)  # [B]
        end = start + n  # [B]
        offset = torch.cumsum(n, 0) - n  # [B] flat offset of each chunk
        s_max, l_max = max(lengths), int(end.max())
        # [B, max blocks] block tables, padded with block 0 (padding keys are masked out)
        width = max(len(c.seq.blocks) for c in chunks)
        table = torch.tensor([c.seq.blocks + [0] * (width - len(c.seq.blocks)) for c in chunks])

        def slot(seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return table[seq, pos // cache.block_size] * cache.block_size + pos % cache.block_size

        seq_of = torch.repeat_interleave(torch.arange(b), n)  # [T]
        positions = start[seq_of] + torch.arange(int(n.sum())) - offset[seq_of]  # [T]
        s_range = torch.arange(s_max)
        query_valid = s_range[None, :] < n[:, None]  # [B, S]
        query_index = torch.where(query_valid, offset[:, None] + s_range, 0)  # [B, S]
        query_pos = torch.where(query_valid, start[:, None] + s_range, -1)  # [B, S]
        key_pos = torch.arange(l_max)
        key_slots = torch.where(key_pos[None, :] < end[:, None],
                                slot(torch.arange(b)[:, None], key_pos[None, :].clamp(max=width * cache.block_size - 1)), 0)
        attn_mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, S, L]
        attn_mask[:, :, 0] |= ~query_valid  # padded queries see one key: no all-masked rows
        return cls(
            token_ids=torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.int64),
            positions=positions,
            slots=slot(seq_of, positions),
            query_index=query_index,
            query_valid=query_valid,
            key_slots=key_slots,
            attn_mask=attn_mask,
            last_index=offset + n - 1,
            uniform=min(lengths) == s_max,
        )

    def to(self, device: torch.device | str) -> "StepBatch":
        for name in ("token_ids", "positions", "slots", "query_index", "query_valid", "key_slots", "attn_mask", "last_index"):
            setattr(self, name, getattr(self, name).to(device))
        return self
