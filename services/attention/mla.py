"""Multi-head Latent Attention (DeepSeek-V3), over the paged latent cache.

Per token the cache holds kv_norm(c_kv) [C] and the roped, single-head k_pe [R]. Two forms compute the same
attention from it:
  * absorbed (default): W_UK is folded into the query (q_nope -> [nh, C]) and W_UV applied after attention,
    so keys and values are never expanded per head;
  * naive: per-head k_nope and v are expanded from the cached latent with kv_b_proj (the textbook form).
Layouts: q per head = [nope | rope]; kv_a output = [latent C | k_rope R]; kv_b rows per head = [k_nope | v].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.attention.batch import StepBatch
from services.attention.kv_cache import PagedLatentCache
from services.attention.rope import Rotary
from services.common.config import ModelConfig
from services.common.layers import linear, rms_norm


@dataclass
class MLAWeights:
    """Dense weights in the compute dtype (the gateway dequantizes FP8 attention weights at load)."""

    q_a: torch.Tensor | None  # [q_lora, H]
    q_a_norm: torch.Tensor | None  # [q_lora]
    q_b: torch.Tensor  # [nh * (nope + rope), q_lora or H] (q_proj when q_lora_rank is None)
    kv_a: torch.Tensor  # [C + R, H]
    kv_a_norm: torch.Tensor  # [C]
    kv_b: torch.Tensor  # [nh * (nope + v), C]
    o: torch.Tensor  # [H, nh * v]


class MLA:
    def __init__(self, cfg: ModelConfig, w: MLAWeights, absorb: bool = True):
        self.cfg = cfg
        self.w = w
        self.absorb = absorb
        self.nh, self.dn, self.dr, self.dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.c = cfg.kv_lora_rank
        kv_b = w.kv_b.view(self.nh, self.dn + self.dv, self.c)
        self.w_uk = kv_b[:, : self.dn].contiguous()  # [nh, nope, C]
        self.w_uv = kv_b[:, self.dn :].contiguous()  # [nh, v, C]
        self.scale = cfg.softmax_scale

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: PagedLatentCache, layer: int,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H] (normed) -> [T, H]. Writes the new tokens' latents to the cache, then attends."""
        t = x.shape[0]
        w, eps = self.w, self.cfg.rms_norm_eps
        q_in = rms_norm(linear(x, w.q_a), w.q_a_norm, eps) if w.q_a is not None else x
        q = linear(q_in, w.q_b).reshape(t, self.nh, self.dn + self.dr)  # [T, nh, nope + rope]
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        q_pe = Rotary.apply(q_pe, cos, sin)  # [T, nh, R]
        latent, k_pe = linear(x, w.kv_a).split([self.c, self.dr], dim=-1)  # [T, C], [T, R]
        cache.write(layer, batch.slots, rms_norm(latent, w.kv_a_norm, eps), Rotary.apply(k_pe, cos, sin))

        keys, pe_keys = cache.gather(layer, batch.key_slots)  # [B, L, C], [B, L, R]
        keys, pe_keys = keys.to(x.dtype), pe_keys.to(x.dtype)
        qn = q_nope[batch.query_index]  # [B, S, nh, nope]
        qp = q_pe[batch.query_index]  # [B, S, nh, R]
        b, s = batch.query_index.shape
        rope_scores = torch.einsum("bshr,blr->bshl", qp, pe_keys)  # [B, S, nh, L]
        if self.absorb:
            q_lat = torch.einsum("bshd,hdc->bshc", qn, self.w_uk)  # [B, S, nh, C]
            scores = torch.bmm(q_lat.reshape(b, s * self.nh, self.c), keys.transpose(1, 2)).view(b, s, self.nh, -1)
        else:
            k_nope = torch.einsum("blc,hdc->blhd", keys, self.w_uk)  # [B, L, nh, nope]
            scores = torch.einsum("bshd,blhd->bshl", qn, k_nope)
        scores = (scores + rope_scores) * self.scale
        scores = scores.masked_fill(~batch.attn_mask[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)  # [B, S, nh, L]
        if self.absorb:
            o_lat = torch.bmm(probs.reshape(b, s * self.nh, -1), keys).view(b, s, self.nh, self.c)
            out = torch.einsum("bshc,hdc->bshd", o_lat, self.w_uv)  # [B, S, nh, v]
        else:
            v = torch.einsum("blc,hdc->blhd", keys, self.w_uv)  # [B, L, nh, v]
            out = torch.einsum("bshl,blhd->bshd", probs, v)
        out = out[batch.query_valid]  # [T, nh, v]: (b, s) order is the flat token order
        return linear(out.reshape(t, self.nh * self.dv), w.o)
