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

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, rope_dim/2] (fp32, amplitude-scaled)."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, R/2]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., R] rotated by cos/sin [T, R/2] on interleaved pairs; computed in fp32."""
        shape = x.shape
        pairs = x.to(torch.float32).reshape(*shape[:-1], shape[-1] // 2, 2)  # [T, ..., R/2, 2]
        extra = (1,) * (x.dim() - 2)
        c = cos.view(cos.shape[0], *extra, cos.shape[1])
        s = sin.view(sin.shape[0], *extra, sin.shape[1])
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
        return out.reshape(shape).to(x.dtype)
