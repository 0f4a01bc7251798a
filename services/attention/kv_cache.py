"""The paged latent KV cache of MLA: per token and layer, kv_norm(c_kv) [kv_lora_rank] and the roped k_pe
[qk_rope_head_dim], stored side by side (576 values per token for DeepSeek-V3) in fixed-size blocks.

Sequences hold lists of blocks (block tables); a full cache refuses new sequences instead of overwriting. With
prefix caching, full blocks are named by the tokens that fill them (prefix_index.py) and may be held by several
sequences at once (reference counts); a named block nobody holds stays cached until its room is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.attention.prefix_index import ROOT, PrefixIndex, block_hash, chain_hashes
from services.errors import CacheFullError
from services.format.config import ModelConfig


@dataclass
class SequenceBlocks:
    """One sequence's place in the cache: its blocks and how many tokens are written."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    hashes: list[bytes] = field(default_factory=list)  # prefix caching: the names of its first full blocks
    root: bytes = ROOT  # prefix caching: the chain's start (a request's cache salt)


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks that hold the first `tokens` of a prompt (prefix caching)."""

    blocks: list[int]
    hashes: list[bytes]
    tokens: int
    unheld: int  # of them, blocks no sequence holds now: taking them uses free room


NO_HIT = PrefixHit([], [], 0, 0)


class PagedLatentCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        mtp: bool = False,
        prefix_caching: bool = False,
    ):
        """`mtp`: one more layer slot per MTP layer (index num_hidden_layers + k), at the same slots as the main
        layers: the MTP block's entry for position i sits where the main layers' entries for position i do.
        `prefix_caching`: full blocks are kept and found again by their tokens (`match`, `adopt`, `register`)."""
        self.kv_lora_rank = cfg.kv_lora_rank
        self.width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
        # [layers, blocks * block_size, kv_lora + rope]: flat slots, slot = block * block_size + offset
        self.data = torch.zeros(self.num_layers, num_blocks * block_size, self.width, dtype=dtype, device=device)
        self._free = list(range(num_blocks - 1, -1, -1))  # never named or evicted: handed out first
        self._holders = [0] * num_blocks  # sequences holding each block
        self.prefix = PrefixIndex() if prefix_caching else None

    # ---- block accounting -------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        """Blocks that can be handed out: free ones and cached ones that no sequence holds."""
        return len(self._free) + (self.prefix.evictable if self.prefix else 0)

    def blocks_needed(self, seq: SequenceBlocks, new_tokens: int) -> int:
        total = -(-(seq.length + new_tokens) // self.block_size)
        return max(0, total - len(seq.blocks))

    def can_fit(self, seq: SequenceBlocks, new_tokens: int) -> bool:
        return self.blocks_needed(seq, new_tokens) <= self.free_blocks

    def reserve(self, seq: SequenceBlocks, new_tokens: int) -> None:
        need = self.blocks_needed(seq, new_tokens)
        if need > self.free_blocks:
            raise CacheFullError(f"need {need} blocks, {self.free_blocks} free")
        for _ in range(need):
            block = self._free.pop() if self._free else self.prefix.evict()
            self._holders[block] = 1
            seq.blocks.append(block)

    def release(self, seq: SequenceBlocks) -> None:
        """The sequence lets its blocks go: a block nobody else holds is free again, or (named) stays cached,
        its last block first in line to be evicted."""
        freed = []
        for block in reversed(seq.blocks):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                if self.prefix is not None and self.prefix.is_named(block):
                    self.prefix.park(block)
                else:
                    freed.append(block)
        self._free.extend(freed)  # the sequence's first block on top: reused first, in order
        seq.blocks.clear()
        seq.hashes.clear()
        seq.length = 0

    # ---- prefix caching ---------------------------------------------------------------------------------
    def match(self, tokens: list[int], root: bytes = ROOT) -> PrefixHit:
        """The cached blocks that hold the longest run of full blocks at the start of `tokens` (a chain from
        `root`: a cache salt's)."""
        if self.prefix is None:
            return NO_HIT
        found = self.prefix.lookup(chain_hashes(tokens, self.block_size, root))
        blocks = [b for b, _ in found]
        unheld = sum(self.prefix.is_unheld(b) for b in blocks)
        return PrefixHit(blocks, [h for _, h in found], len(blocks) * self.block_size, unheld)

    def adopt(self, seq: SequenceBlocks, hit: PrefixHit) -> None:
        """An empty sequence takes a hit's blocks as its first, already written."""
        if seq.blocks or seq.length:
            raise ValueError("only an empty sequence adopts cached blocks")
        for block in hit.blocks:
            if self._holders[block] == 0:
                self.prefix.take(block)
            self._holders[block] += 1
        seq.blocks.extend(hit.blocks)
        seq.hashes.extend(hit.hashes)
        seq.length = hit.tokens

    def extend(self, seq: SequenceBlocks, tokens: Callable[[int, int], list[int]], limit: int) -> int:
        """A sequence whose written positions end on its named blocks takes the cached blocks that hold its next
        tokens (those of positions up to `limit`; `tokens(start, stop)` gives them) in place of the ones it
        reserved and has not written (given back). Returns the positions gained: a prompt admitted beside another
        with the same start finds that one's blocks once they are written."""
        if not self._continues_chain(seq, limit):
            return 0
        parent = seq.hashes[-1] if seq.hashes else seq.root
        found = self.prefix.lookup(chain_hashes(tokens(seq.length, limit), self.block_size, parent))
        for block, h in found:
            i = len(seq.hashes)
            mine = seq.blocks[i]  # reserved at admission, unwritten, held by this sequence alone
            self._holders[mine] = 0
            self._free.append(mine)
            if self._holders[block] == 0:
                self.prefix.take(block)
            self._holders[block] += 1
            seq.blocks[i] = block
            seq.hashes.append(h)
            seq.length += self.block_size
        return len(found) * self.block_size

    def next_name(self, seq: SequenceBlocks, tokens: Callable[[int, int], list[int]], limit: int) -> bytes | None:
        """The name of the block a sequence writes next, when its written positions end on its named blocks and a
        whole block of its tokens up to `limit` is left (else None)."""
        if not self._continues_chain(seq, limit):
            return None
        return block_hash(seq.hashes[-1] if seq.hashes else seq.root, tokens(seq.length, seq.length + self.block_size))

    def _continues_chain(self, seq: SequenceBlocks, limit: int) -> bool:
        """Prefix caching is on, the sequence's written positions end on its named blocks, and a whole block of its
        positions up to `limit` is left to find or write."""
        return (
            self.prefix is not None
            and seq.length == len(seq.hashes) * self.block_size
            and limit - seq.length >= self.block_size
        )

    def register(self, seq: SequenceBlocks, tokens: Callable[[int, int], list[int]]) -> None:
        """Name the sequence's full blocks that are written and not named yet; `tokens(start, stop)` gives the
        sequence's tokens at positions start..stop-1."""
        if self.prefix is None:
            return
        done, full = len(seq.hashes), seq.length // self.block_size
        if full <= done:
            return
        parent = seq.hashes[-1] if seq.hashes else seq.root
        written = tokens(done * self.block_size, full * self.block_size)
        for i, h in enumerate(chain_hashes(written, self.block_size, parent)):
            seq.hashes.append(h)
            self.prefix.name(seq.blocks[done + i], h)

    def usage(self) -> float:
        return 1.0 - self.free_blocks / self.num_blocks

    # ---- slots: slot = block * block_size + offset (StepBatch.build maps positions to slots) ----------
    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        """latent [T, kv_lora] (already normed), k_pe [T, rope] (already roped) into `slots` [T]."""
        self.data[layer, slots] = torch.cat((latent, k_pe), dim=-1).to(self.data.dtype)

    def gather(self, layer: int, key_slots: torch.Tensor) -> torch.Tensor:
        """key_slots [B, L] -> rows [B, L, kv_lora + rope]: the latent, then the roped k_pe."""
        return self.data[layer].index_select(0, key_slots.reshape(-1)).view(*key_slots.shape, self.width)
