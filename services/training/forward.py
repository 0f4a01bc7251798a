"""A differentiable DeepSeek-V3 forward for training: plain torch, no cache, whole sequences from position 0.

The serving engine (services/gateway/model.py) runs inference only; this is the same model with a backward
pass, so what is trained here is what gets served (tests/test_training.py holds the two to 1e-4 in
log-probability). Parameters are float32 tensors keyed by the checkpoint's own names (`stored_name`):

  embed -> per layer: x += MLA(rms(x)); x += FFN(rms(x)) -> rms -> lm_head

MLA in its naive form: q = q_b(rms(q_a(x))) (or q_proj(x)) split per head into [nope | rope]; kv_a(x) =
[latent C | k_rope R]; k_nope and v per head from kv_b(rms(latent)); YaRN RoPE (services/attention/rope.py) on
the interleaved rope halves, k_rope one head shared by all; causal softmax over q.k at `cfg.softmax_scale`
(qk_head_dim^-0.5 * mscale^2). FFN is dense SwiGLU for the first `first_k_dense_replace` layers, then MoE: the
gateway's router (sigmoid scores, e_score_correction_bias for selection only, group-limited top-k, weights
normalised and scaled by routed_scaling_factor), every routed expert on its tokens, plus the shared experts.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from services.attention.rope import Rotary
from services.format.checkpoint import CheckpointReader
from services.format.config import ModelConfig
from services.format.tensor_names import Kind, TensorSpec, model_specs, stored_name
from services.format.weights import read_linear, read_plain
from services.gateway.router import Router
from services.math.layers import rms_norm


def bias_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.e_score_correction_bias"


class TrainingModel:
    """DeepSeek-V3 as float32 tensors keyed by checkpoint name. `forward` is the main model's (a checkpoint's
    multi-token-prediction layers are held and written back, not run); the routing biases are not trained by
    gradient (see trainer.update_routing_bias)."""

    def __init__(self, cfg: ModelConfig, params: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.specs = model_specs(cfg)
        missing = [stored_name(s) for s in self.specs if stored_name(s) not in params]
        if missing:
            raise KeyError(f"missing parameters: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        self.params = params
        self.rotary = Rotary(cfg)

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> TrainingModel:
        """Every tensor of a checkpoint, FP8 projections dequantized, as float32; those the forward trains
        (all of the main model but the routing biases) require grad."""
        params = {}
        with CheckpointReader(model_dir) as reader:
            cfg = reader.config
            for spec in model_specs(cfg):
                main = spec.layer is None or spec.layer < cfg.num_hidden_layers
                trained = main and spec.kind is not Kind.BIAS
                params[stored_name(spec)] = _read_float32(reader, spec).requires_grad_(trained)
        return cls(cfg, params)

    def trainable(self) -> list[torch.Tensor]:
        return [t for t in self.params.values() if t.requires_grad]

    def stored_value(self, spec: TensorSpec) -> torch.Tensor:
        """What to store for one checkpoint entry now, detached: its own value, or for a multi-token-prediction
        layer's copy of the embedding or the output head, the (trained) original's."""
        return self.params[_stored_copy_of(self.cfg, spec) or stored_name(spec)].detach()

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, loads: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """ids [B, T] (each row a sequence from position 0) -> logits [B, T, V] fp32.

        `loads`, when given, receives each MoE layer's routed-token count per expert ([E], int64)."""
        cfg, p = self.cfg, self.params
        b, t = ids.shape
        x = p["model.embed_tokens.weight"][ids]  # [B, T, H]
        rotation = self.rotary.rotation(torch.arange(t))  # [T, R/2] complex
        for layer in range(cfg.num_hidden_layers):
            pre = f"model.layers.{layer}."
            x = x + self.attention(layer, rms_norm(x, p[pre + "input_layernorm.weight"], cfg.rms_norm_eps), rotation)
            h = rms_norm(x, p[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps).reshape(b * t, -1)
            if cfg.is_moe_layer(layer):
                x = x + self.moe(layer, h, loads).view(b, t, -1)
            else:
                x = x + self.mlp(pre + "mlp.", h).view(b, t, -1)
        return F.linear(rms_norm(x, p["model.norm.weight"], cfg.rms_norm_eps), p["lm_head.weight"])

    def loss(self, ids: torch.Tensor, loads: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over ids [B, T] (every position predicts the one after it)."""
        logits = self.forward(ids, loads)[:, :-1]  # [B, T-1, V]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def attention(self, layer: int, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """MLA, naive form, causal over whole sequences. x [B, T, H] (normed) -> [B, T, H]."""
        cfg, p = self.cfg, self.params
        pre, eps = f"model.layers.{layer}.self_attn.", cfg.rms_norm_eps
        b, t, _ = x.shape
        nh, dn, dr, dv, c = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        if cfg.q_lora_rank:
            q_a = rms_norm(F.linear(x, p[pre + "q_a_proj.weight"]), p[pre + "q_a_layernorm.weight"], eps)
            q = F.linear(q_a, p[pre + "q_b_proj.weight"])
        else:
            q = F.linear(x, p[pre + "q_proj.weight"])
        q_nope, q_pe = q.view(b, t, nh, dn + dr).split([dn, dr], dim=-1)  # [B, T, nh, nope], [B, T, nh, R]
        latent, k_pe = F.linear(x, p[pre + "kv_a_proj_with_mqa.weight"]).split([c, dr], dim=-1)  # [B, T, C], [B, T, R]
        kv = F.linear(rms_norm(latent, p[pre + "kv_a_layernorm.weight"], eps), p[pre + "kv_b_proj.weight"])
        k_nope, v = kv.view(b, t, nh, dn + dv).split([dn, dv], dim=-1)  # [B, T, nh, nope], [B, T, nh, v]
        q_pe = _rope(q_pe, rotation)
        k_pe = _rope(k_pe[:, :, None, :], rotation).expand(b, t, nh, dr)  # one head, shared by all
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # [B, nh, T, nope + R]
        k = torch.cat((k_nope, k_pe), dim=-1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=cfg.softmax_scale)
        return F.linear(out.transpose(1, 2).reshape(b, t, nh * dv), p[pre + "o_proj.weight"])  # [B, T, H]

    def mlp(self, prefix: str, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU: down(silu(gate(h)) * up(h)). h [N, H] -> [N, H]."""
        p = self.params
        gate = F.linear(h, p[prefix + "gate_proj.weight"])
        return F.linear(F.silu(gate) * F.linear(h, p[prefix + "up_proj.weight"]), p[prefix + "down_proj.weight"])

    def moe(self, layer: int, h: torch.Tensor, loads: dict[int, torch.Tensor] | None) -> torch.Tensor:
        """Routed experts (each on the tokens routed to it, weighted) plus the shared experts. h [N, H] -> [N, H]."""
        cfg, p = self.cfg, self.params
        pre = f"model.layers.{layer}.mlp."
        router = Router(cfg, p[pre + "gate.weight"], p[bias_name(layer)])
        topk_idx, topk_w = router(h)  # [N, K] int64, [N, K] fp32 (differentiable in the gate weight)
        if loads is not None:
            loads[layer] = torch.bincount(topk_idx.flatten(), minlength=cfg.n_routed_experts)
        routed = torch.zeros_like(h)
        for e in range(cfg.n_routed_experts):
            rows, slot = (topk_idx == e).nonzero(as_tuple=True)  # the tokens routed to e, and where in their top-k
            if rows.numel():
                y = self.mlp(f"{pre}experts.{e}.", h[rows]) * topk_w[rows, slot, None]  # [n, H]
                routed = routed.index_add(0, rows, y)
        if cfg.n_shared_experts:
            routed = routed + self.mlp(pre + "shared_experts.", h)
        return routed


def _rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, R] rotated at positions 0..T-1 (rotation [T, R/2]): the serving engine's own Rotary.apply,
    which takes the position first."""
    return Rotary.apply(x.transpose(0, 1), rotation).transpose(0, 1)


def _stored_copy_of(cfg: ModelConfig, spec: TensorSpec) -> str | None:
    """DeepSeek-V3 checkpoints store the MTP layers' embedding and output head as copies of the main model's:
    the name of the original for such a copy, else None. (The MTP layers' own tensors are not trained here.)"""
    if spec.layer is None or spec.layer < cfg.num_hidden_layers:
        return None
    local = spec.name.removeprefix(f"model.layers.{spec.layer}.")
    return {"embed_tokens": "model.embed_tokens.weight", "shared_head.head": "lm_head.weight"}.get(local)


def _read_float32(reader: CheckpointReader, spec: TensorSpec) -> torch.Tensor:
    if spec.kind is Kind.LINEAR:
        return read_linear(reader, spec).dense(torch.float32).clone()
    return read_plain(reader, spec, torch.float32).clone()
