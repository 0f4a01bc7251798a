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

from kernels import cpu_attention
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


SHORT_CHUNK = 8  # chunks up to this long (decodes, a token and its MTP drafts) batch together in a mixed step
# queries of a long chunk attended at once: their [q, nh, L] scores stay small enough for the CPU's caches
# (64 against 256: 512 prompt tokens at 16K context 1.8x faster on CPU, BENCHMARKS.md, long prompts)
QUERY_BLOCK = 64


class MLA:
    def __init__(self, cfg: ModelConfig, w: MLAWeights, absorb: bool = True):
        self.cfg = cfg
        self.w = w
        self.absorb = absorb
        self.nh, self.dn, self.dr, self.dv = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        )
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

    def forward(
        self,
        x: torch.Tensor,
        batch: StepBatch,
        cache: PagedLatentCache,
        layer: int,
        rotation: torch.Tensor,
    ) -> torch.Tensor:
        """x [T, H] (normed) -> [T, H]. Writes the new tokens' latents to the cache, then attends."""
        t = x.shape[0]
        w, eps = self.w, self.cfg.rms_norm_eps
        a = linear(x, self.in_proj)  # [T, q_lora + C + R]
        q_in = rms_norm(a[:, : self.q_lora], w.q_a_norm, eps) if self.q_lora else x
        q = linear(q_in, w.q_b).reshape(t, self.nh, self.dn + self.dr)  # [T, nh, nope + rope]
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        q_pe = Rotary.apply(q_pe, rotation)  # [T, nh, R]
        self._write(a, batch, cache, layer, rotation)

        out = self._attend(q_nope, q_pe, batch, cache, layer)  # [T, nh, v]
        return linear(out.reshape(t, self.nh * self.dv), w.o)

    def write_latents(
        self, x: torch.Tensor, batch: StepBatch, cache: PagedLatentCache, layer: int, rotation: torch.Tensor
    ) -> None:
        """Only the cache entries `forward` writes for x [T, H] (normed), without attending: for positions whose
        output nobody reads (the MTP layer's, fed so that later positions can attend to them)."""
        self._write(linear(x, self.in_proj), batch, cache, layer, rotation)

    def _write(
        self, a: torch.Tensor, batch: StepBatch, cache: PagedLatentCache, layer: int, rotation: torch.Tensor
    ) -> None:
        """a [T, q_lora + C + R] (the input projection) -> the tokens' latents and roped k_pe in the cache."""
        latent, k_pe = a[:, self.q_lora :].split([self.c, self.dr], dim=-1)  # [T, C], [T, R]
        cache.write(
            layer, batch.slots, rms_norm(latent, self.w.kv_a_norm, self.cfg.rms_norm_eps), Rotary.apply(k_pe, rotation)
        )

    def _attend(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: StepBatch, cache: PagedLatentCache, layer: int
    ) -> torch.Tensor:
        """q_nope [T, nh, nope], q_pe [T, nh, R] -> [T, nh, v]. A uniform step attends as one padded batch; a
        mixed one batches its decodes over their own keys and runs each longer chunk alone, in query blocks over
        the keys those queries can see (the cost is what the tokens need: new tokens x context)."""
        dtype, device = q_nope.dtype, q_nope.device
        if self.absorb and cpu_attention.handles(q_nope, cache.data):
            return self._attend_kernel(q_nope, q_pe, batch, cache, layer)
        if batch.uniform and batch.lengths[0] <= QUERY_BLOCK:  # decode steps, short equal chunks
            b, s = len(batch.lengths), batch.lengths[0]
            rows = cache.gather(layer, batch.key_slots).to(dtype)  # [B, L, C + R]: latent | roped k_pe
            out = self._attend_padded(
                q_nope.view(b, s, self.nh, self.dn), q_pe.view(b, s, self.nh, self.dr), rows, batch.attn_mask
            )
            return out.reshape(b * s, self.nh, self.dv)
        out = q_nope.new_empty(q_nope.shape[0], self.nh, self.dv)
        short = _short_batch(batch)
        if short:
            self._attend_short(q_nope, q_pe, batch, cache, layer, short, out)
        for i, n in enumerate(batch.lengths):
            if i not in short:
                o, length = batch.offsets[i], batch.key_lengths[i]
                rows = _sequence_rows(cache, layer, batch, i, length).to(dtype)  # [1, L_i, C + R]
                for q0 in range(0, n, QUERY_BLOCK):
                    q1 = min(n, q0 + QUERY_BLOCK)
                    visible = length - n + q1  # keys up to the block's last query (causal)
                    query_pos = torch.arange(length - n + q0, visible, device=device)  # [q]
                    mask = torch.arange(visible, device=device)[None, None, :] <= query_pos[None, :, None]  # [1, q, L]
                    out[o + q0 : o + q1] = self._attend_padded(
                        q_nope[None, o + q0 : o + q1], q_pe[None, o + q0 : o + q1], rows[:, :visible], mask
                    )[0]
        return out

    def _attend_kernel(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: StepBatch, cache: PagedLatentCache, layer: int
    ) -> torch.Tensor:
        """The absorbed attention of every sequence in one C kernel pass over its keys in the paged cache (CPU,
        float32): no gathered context, no padding, no score tensor (kernels/cpu_attention.py)."""
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [T, nh, C], head-major
        q_start, q_len, k_len = batch.sequence_tensors
        o_lat = cpu_attention.latent_attention(
            q_lat, q_pe, cache.data[layer], batch.key_slots, q_start, q_len, k_len, self.scale
        )  # [T, nh, C], head-major
        return torch.bmm(o_lat.transpose(0, 1), self.w_uv.transpose(1, 2)).transpose(0, 1)  # [T, nh, v]

    def _attend_short(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        batch: StepBatch,
        cache: PagedLatentCache,
        layer: int,
        short: list[int],
        out: torch.Tensor,
    ) -> None:
        """The short chunks of a mixed step (decodes; a token and its drafts) as one batch padded to the longest of
        them, each over its own keys, causal; into `out` at their flat tokens."""
        device = q_nope.device
        n = torch.tensor([batch.lengths[i] for i in short], device=device)  # [Bs]
        ends = torch.tensor([batch.key_lengths[i] for i in short], device=device)  # [Bs]
        offsets = torch.tensor([batch.offsets[i] for i in short], device=device)  # [Bs]
        j = torch.arange(int(n.max()), device=device)  # [S]
        valid = j[None, :] < n[:, None]  # [Bs, S]
        idx = torch.where(valid, offsets[:, None] + j, 0)  # [Bs, S] flat token of each query (padding: token 0)
        query_pos = ends[:, None] - n[:, None] + j  # [Bs, S]; padding queries lie past the end (results dropped)
        width = int(ends.max())
        mask = torch.arange(width, device=device)[None, None, :] <= query_pos[:, :, None]  # [Bs, S, L]
        rows = cache.gather(layer, batch.key_slots[torch.tensor(short, device=device), :width]).to(q_nope.dtype)
        out[idx[valid]] = self._attend_padded(q_nope[idx], q_pe[idx], rows, mask)[valid]

    def _attend_padded(
        self, qn: torch.Tensor, qp: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """qn [B, S, nh, nope], qp [B, S, nh, R], rows [B, L, C + R], mask [B, S, L] -> [B, S, nh, v]."""
        b, s = qn.shape[:2]
        keys = rows[..., : self.c]  # [B, L, C]
        if self.absorb:
            q_lat = torch.einsum("bshd,hdc->bshc", qn, self.w_uk)  # [B, S, nh, C]
            q_cat = torch.cat((q_lat, qp), dim=-1).reshape(b, s * self.nh, self.c + self.dr)  # latent | rope parts
            scores = torch.bmm(q_cat, rows.transpose(1, 2)).view(b, s, self.nh, -1)  # [B, S, nh, L]
        else:
            k_nope = torch.einsum("blc,hdc->blhd", keys, self.w_uk)  # [B, L, nh, nope]
            scores = torch.einsum("bshd,blhd->bshl", qn, k_nope) + torch.einsum(
                "bshr,blr->bshl", qp, rows[..., self.c :]
            )
        scores = (scores * self.scale).masked_fill_(~mask[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(qn.dtype)  # [B, S, nh, L]
        if self.absorb:
            o_lat = torch.bmm(probs.reshape(b, s * self.nh, -1), keys).view(b, s, self.nh, self.c)
            return torch.einsum("bshc,hdc->bshd", o_lat, self.w_uv)  # [B, S, nh, v]
        v = torch.einsum("blc,hdc->blhd", keys, self.w_uv)  # [B, L, nh, v]
        return torch.einsum("bshl,blhd->bshd", probs, v)


def _short_batch(batch: StepBatch) -> list[int]:
    """The chunks of a mixed step that attend as one padded batch: the short ones (decodes, 1 + MTP drafts, a
    small prefill chunk) whose keys are at most twice the lower median of theirs, so that no short chunk pads the
    others to a much longer context (a few prompt tokens at 16K beside decodes at 100 would make every decode
    read 16K keys). The rest run alone."""
    short = [i for i, n in enumerate(batch.lengths) if n <= SHORT_CHUNK]
    if not short:
        return []
    keys = sorted(batch.key_lengths[i] for i in short)
    limit = 2 * keys[(len(keys) - 1) // 2]
    return [i for i in short if batch.key_lengths[i] <= limit]


def _sequence_rows(cache: PagedLatentCache, layer: int, batch: StepBatch, i: int, length: int) -> torch.Tensor:
    """Sequence i's first `length` keys [1, L, C + R]: a view of the cache when they lie in consecutive slots (no
    copy of a long context at every layer), else gathered."""
    start = batch.key_start[i] if batch.key_start is not None else None
    if start is not None:
        return cache.data[layer, start : start + length].unsqueeze(0)
    return cache.gather(layer, batch.key_slots[i : i + 1, :length])
