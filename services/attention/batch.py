"""One forward step's batch: several sequences, each with a chunk of new tokens at its own positions.

Tokens are packed flat ([T]) for everything that is per token (projections, router, experts). Attention reads
each sequence's keys from the paged cache: a step whose chunks all have the same length (every decode step)
is viewed as [B, S] against padded keys [B, L]; a mixed step (prefill chunks beside decodes) attends per
sequence over its own keys only, so it costs the sum over sequences of new tokens x context, not
B x longest chunk x longest context. Built once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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
    key_slots: torch.Tensor  # [B, L] cache slots of each sequence's keys (padding points at slot 0)
    last_index: torch.Tensor  # [B] flat index of each sequence's last new token
    offsets: list[int]  # [B] flat index of each sequence's first new token
    lengths: list[int]  # [B] new tokens per sequence
    key_lengths: list[int]  # [B] keys each sequence attends to (its context after this step)
    uniform: bool = False  # every chunk has the same length: flat [T] is exactly [B, S] (all decode steps)
    # [B] the first cache slot of a sequence whose keys lie in consecutive slots (its blocks in order, as a
    # sequence admitted into free blocks gets them), else None: its keys can be read as a view, not gathered
    key_start: list[int | None] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @cached_property
    def sequence_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """offsets, lengths, key_lengths as [B] int64 tensors (once per step, for every layer)."""
        return tuple(torch.tensor(x, dtype=torch.int64) for x in (self.offsets, self.lengths, self.key_lengths))

    @property
    def attn_mask(self) -> torch.Tensor:
        """[B, S, L] bool for a uniform step: key visible to query (causal, within the sequence)."""
        s, l_max = self.lengths[0], self.key_slots.shape[1]
        key_pos = torch.arange(l_max, device=self.key_slots.device)
        end = torch.tensor(self.key_lengths, device=self.key_slots.device)  # [B]
        query_pos = end[:, None] - s + torch.arange(s, device=end.device)  # [B, S]
        return key_pos[None, None, :] <= query_pos[:, :, None]

    @classmethod
    def build(cls, chunks: list[SequenceChunk], cache: PagedLatentCache) -> StepBatch:
        """Advances each sequence's length by its chunk. Blocks must be reserved already (the scheduler does)."""
        if not chunks:
            raise ValueError("empty step")
        lengths = [len(c.token_ids) for c in chunks]
        if 0 in lengths:
            raise ValueError("a sequence in the step has no new tokens")
        starts_list = [c.seq.length for c in chunks]
        for chunk, n in zip(chunks, lengths):
            if cache.blocks_needed(chunk.seq, n):
                raise ValueError(
                    f"a sequence needs {cache.blocks_needed(chunk.seq, n)} more cache blocks: reserve first"
                )
            chunk.seq.length += n
        b = len(chunks)
        n = torch.tensor(lengths)  # [B]
        start = torch.tensor(starts_list)  # [B]
        end = start + n  # [B]
        offset = torch.cumsum(n, 0) - n  # [B] flat offset of each chunk
        l_max = int(end.max())
        # [B, max blocks] block tables, padded with block 0 (padding keys are masked out)
        width = max(len(c.seq.blocks) for c in chunks)
        table = torch.tensor([c.seq.blocks + [0] * (width - len(c.seq.blocks)) for c in chunks])

        def slot(seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return table[seq, pos // cache.block_size] * cache.block_size + pos % cache.block_size

        seq_of = torch.repeat_interleave(torch.arange(b), n)  # [T]
        positions = start[seq_of] + torch.arange(int(n.sum())) - offset[seq_of]  # [T]
        key_pos = torch.arange(l_max)
        key_slots = torch.where(
            key_pos[None, :] < end[:, None],
            slot(torch.arange(b)[:, None], key_pos[None, :].clamp(max=width * cache.block_size - 1)),
            0,
        )
        return cls(
            token_ids=torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.int64),
            positions=positions,
            slots=slot(seq_of, positions),
            key_slots=key_slots,
            last_index=offset + n - 1,
            offsets=offset.tolist(),
            lengths=lengths,
            key_lengths=end.tolist(),
            uniform=min(lengths) == max(lengths),
            key_start=[_consecutive_start(c.seq.blocks, e, cache.block_size) for c, e in zip(chunks, end.tolist())],
        )

    def to(self, device: torch.device | str) -> StepBatch:
        for name in ("token_ids", "positions", "slots", "key_slots", "last_index"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def _consecutive_start(blocks: list[int], keys: int, block_size: int) -> int | None:
    """The first slot of `keys` keys held in `blocks`, when the blocks they need are consecutive; else None."""
    used = blocks[: -(-keys // block_size)]
    return used[0] * block_size if used == list(range(used[0], used[0] + len(used))) else None
