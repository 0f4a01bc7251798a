"""The paged latent KV cache of MLA: per token and layer, kv_norm(c_kv) [kv_lora_rank] and the roped k_pe
[qk_rope_head_dim], stored side by side (576 values per token for DeepSeek-V3) in fixed-size blocks.

Sequences own lists of blocks (block tables); a full cache refuses new sequences instead of overwriting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.errors import CacheFullError
from services.format.config import ModelConfig


@dataclass
class SequenceBlocks:
    """One sequence's place in the cache: its blocks and how many tokens are written."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0


class PagedLatentCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        mtp: bool = False,
    ):
        """`mtp`: one more layer slot per MTP layer (index num_hidden_layers + k), at the same slots as the main
        layers: the MTP block's entry for position i sits where the main layers' entries for position i do."""
        self.kv_lora_rank = cfg.kv_lora_rank
        self.width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
        # [layers, blocks * block_size, kv_lora + rope]: flat slots, slot = block * block_size + offset
        self.data = torch.zeros(self.num_layers, num_blocks * block_size, self.width, dtype=dtype, device=device)
        self._free = list(range(num_blocks - 1, -1, -1))

    # ---- block accounting -------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq: SequenceBlocks, new_tokens: int) -> int:
        total = -(-(seq.length + new_tokens) // self.block_size)
        return max(0, total - len(seq.blocks))

    def can_fit(self, seq: SequenceBlocks, new_tokens: int) -> bool:
        return self.blocks_needed(seq, new_tokens) <= self.free_blocks

    def reserve(self, seq: SequenceBlocks, new_tokens: int) -> None:
        need = self.blocks_needed(seq, new_tokens)
        if need > self.free_blocks:
            raise CacheFullError(f"need {need} blocks, {self.free_blocks} free")
        seq.blocks.extend(self._free.pop() for _ in range(need))

    def release(self, seq: SequenceBlocks) -> None:
        self._free.extend(reversed(seq.blocks))
        seq.blocks.clear()
        seq.length = 0

    def usage(self) -> float:
        return 1.0 - self.free_blocks / self.num_blocks

    # ---- slots: slot = block * block_size + offset (StepBatch.build maps positions to slots) ----------
    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        """latent [T, kv_lora] (already normed), k_pe [T, rope] (already roped) into `slots` [T]."""
        self.data[layer, slots] = torch.cat((latent, k_pe), dim=-1).to(self.data.dtype)

    def gather(self, layer: int, key_slots: torch.Tensor) -> torch.Tensor:
        """key_slots [B, L] -> rows [B, L, kv_lora + rope]: the latent, then the roped k_pe."""
        return self.data[layer].index_select(0, key_slots.reshape(-1)).view(*key_slots.shape, self.width)
