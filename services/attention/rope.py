"""Rotary position embedding with YaRN, on interleaved pairs (x[2i], x[2i+1]) as DeepSeek applies it.

Frequencies follow YaRN exactly as DeepSeek's `precompute_freqs_cis` and transformers' `_compute_yarn_parameters`:
unchanged below the correction range, divided by `factor` above it, a linear blend in between. The cos/sin
amplitude (`attention_factor`) is mscale(factor, mscale) / mscale(factor, mscale_all_dim), which is 1 for V3.
"""

from __future__ import annotations

import math

import torch

from services.format.config import ModelConfig, yarn_mscale


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [rope_dim/2] fp32, attention_factor)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs  # [dim/2]
    yarn = cfg.yarn
    if yarn is None:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original frequency
    inv_freq = (inv_freq / yarn.factor) * (1 - extrapolation) + inv_freq * extrapolation
    if yarn.mscale and yarn.mscale_all_dim:
        attention_factor = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(yarn.factor, 1.0)
    return inv_freq, attention_factor


class Rotary:
    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu"):
        inv_freq, self.attention_factor = rope_inv_freq(cfg)
        self.inv_freq = inv_freq.to(device)

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [T] -> [T, rope_dim/2] complex64: amplitude x (cos + i sin) of each pair's angle."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, R/2]
        return torch.polar(torch.full_like(angles, self.attention_factor), angles)

    @staticmethod
    def apply(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """x [T, ..., R] rotated by rotation [T, R/2] on interleaved pairs, each pair (x[2i], x[2i+1]) taken as
        x[2i] + i x[2i+1] and multiplied by its turn (one complex product instead of four real ones and a
        stack); computed in fp32."""
        pairs = x.to(torch.float32).unflatten(-1, (-1, 2))  # [T, ..., R/2, 2]
        if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
            pairs = pairs.contiguous()  # a complex view needs whole pairs at even offsets
        turn = rotation.view(rotation.shape[0], *(1,) * (x.dim() - 2), rotation.shape[1])
        return torch.view_as_real(torch.view_as_complex(pairs) * turn).flatten(-2).to(x.dtype)
