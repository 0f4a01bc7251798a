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
from services.format.config import ModelConfig
from services.math.layers import linear, rms_norm
from services.math.packed_linear import Linear


@dataclass
class MLAWeights:
    """Dense weights in the compute dtype (the gateway dequantizes FP8 attention weights at load)."""

    q_a: torch.Tensor | None  # [q_lora, H] (fused with kv_a into MLA.in_proj, then dropped here)
    q_a_norm: torch.Tensor | None  # [q_lora]
    q_b: Linear  # [nh * (nope + rope), q_lora or H] (q_proj when q_lora_rank is None)
    kv_a: torch.Tensor | None  # [C + R, H] (fused into MLA.in_proj, then dropped here)
    kv_a_norm: torch.Tensor  # [C]
    kv_b: torch.Tensor  # [nh * (nope + v), C] (folded into w_uk / w_uv, never applied as a linear)
    o: Linear  # [H, nh * v]


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
        # q_a and kv_a read the same input: one GEMM for both (one weight pass, one call)
        a = [w.q_a] if w.q_a is not None else []
        self.in_proj = Linear(torch.cat(a + [w.kv_a]))  # [(q_lora) + C + R, H]
        self.q_lora = w.q_a.shape[0] if w.q_a is not None else 0
        w.q_a = w.kv_a = None  # in_proj is their one copy

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: PagedLatentCache, layer: int,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H] (normed) -> [T, H]. Writes the new tokens' latents to the cache, then attends."""
        t = x.shape[0]
        w, eps = self.w, self.cfg.rms_norm_eps
        a = linear(x, self.in_proj)  # [T, q_lora + C + R]
        q_in = rms_norm(a[:, : self.q_lora], w.q_a_norm, eps) if self.q_lora else x
        latent, k_pe = a[:, self.q_lora :].split([self.c, self.dr], dim=-1)  # [T, C], [T, R]
        q = linear(q_in, w.q_b).reshape(t, self.nh, self.dn + self.dr)  # [T, nh, nope + rope]
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        q_pe = Rotary.apply(q_pe, cos, sin)  # [T, nh, R]
        cache.write(layer, batch.slots, rms_norm(latent, w.kv_a_norm, eps), Rotary.apply(k_pe, cos, sin))

        rows = cache.gather(layer, batch.key_slots).to(x.dtype)  # [B, L, C + R]: latent | roped k_pe
        keys = rows[..., : self.c]  # [B, L, C]
        b, s = batch.query_index.shape
        if batch.uniform:  # every chunk the same length: the flat tokens are exactly [B, S]
            qn, qp = q_nope.view(b, s, self.nh, self.dn), q_pe.view(b, s, self.nh, self.dr)
        else:
            qn, qp = q_nope[batch.query_index], q_pe[batch.query_index]  # [B, S, nh, nope], [B, S, nh, R]
        if self.absorb:
            q_lat = torch.einsum("bshd,hdc->bshc", qn, self.w_uk)  # [B, S, nh, C]
            q_cat = torch.cat((q_lat, qp), dim=-1).reshape(b, s * self.nh, self.c + self.dr)  # latent | rope parts
            scores = torch.bmm(q_cat, rows.transpose(1, 2)).view(b, s, self.nh, -1)  # [B, S, nh, L]
        else:
            k_nope = torch.einsum("blc,hdc->blhd", keys, self.w_uk)  # [B, L, nh, nope]
            scores = torch.einsum("bshd,blhd->bshl", qn, k_nope) + torch.einsum("bshr,blr->bshl", qp, rows[..., self.c :])
        scores = (scores * self.scale).masked_fill_(~batch.attn_mask[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)  # [B, S, nh, L]
        if self.absorb:
            o_lat = torch.bmm(probs.reshape(b, s * self.nh, -1), keys).view(b, s, self.nh, self.c)
            out = torch.einsum("bshc,hdc->bshd", o_lat, self.w_uv)  # [B, S, nh, v]
        else:
            v = torch.einsum("blc,hdc->blhd", keys, self.w_uv)  # [B, L, nh, v]
            out = torch.einsum("bshl,blhd->bshd", probs, v)
        out = out.reshape(t, self.nh, self.dv) if batch.uniform else out[batch.query_valid]  # [T, nh, v]
        return linear(out.reshape(t, self.nh * self.dv), w.o)
