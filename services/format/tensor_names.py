"""The checkpoint's tensor names and shapes: one list, used by the writer (init-model) and every loader."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from services.format.config import ModelConfig


class Kind(Enum):
    LINEAR = "linear"  # FP8 (with weight_scale_inv) in FP8 checkpoints
    NORM = "norm"  # RMSNorm weight, BF16
    EMBED = "embed"  # embedding / lm_head, BF16
    ROUTER = "router"  # router gate weight, BF16
    BIAS = "bias"  # e_score_correction_bias, FP32
    PROJ = "proj"  # a projection kept in BF16, never FP8 (the MTP layer's eh_proj)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: Kind
    layer: int | None = None
    expert: int | None = None


EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def expert_prefix(layer: int, expert: int) -> str:
    return f"{layer_prefix(layer)}.mlp.experts.{expert}"


def mlp_specs(prefix: str, hidden: int, inter: int, layer: int, expert: int | None = None) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.gate_proj", (inter, hidden), Kind.LINEAR, layer, expert),
        TensorSpec(f"{prefix}.up_proj", (inter, hidden), Kind.LINEAR, layer, expert),
        TensorSpec(f"{prefix}.down_proj", (hidden, inter), Kind.LINEAR, layer, expert),
    ]


def expert_specs(cfg: ModelConfig, layer: int, expert: int) -> list[TensorSpec]:
    return mlp_specs(expert_prefix(layer, expert), cfg.hidden_size, cfg.moe_intermediate_size, layer, expert)


def attention_specs(cfg: ModelConfig, layer: int) -> list[TensorSpec]:
    p = f"{layer_prefix(layer)}.self_attn"
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    specs = []
    if cfg.q_lora_rank:
        specs += [
            TensorSpec(f"{p}.q_a_proj", (cfg.q_lora_rank, h), Kind.LINEAR, layer),
            TensorSpec(f"{p}.q_a_layernorm", (cfg.q_lora_rank,), Kind.NORM, layer),
            TensorSpec(f"{p}.q_b_proj", (nh * cfg.qk_head_dim, cfg.q_lora_rank), Kind.LINEAR, layer),
        ]
    else:
        specs.append(TensorSpec(f"{p}.q_proj", (nh * cfg.qk_head_dim, h), Kind.LINEAR, layer))
    specs += [
        TensorSpec(f"{p}.kv_a_proj_with_mqa", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h), Kind.LINEAR, layer),
        TensorSpec(f"{p}.kv_a_layernorm", (cfg.kv_lora_rank,), Kind.NORM, layer),
        TensorSpec(
            f"{p}.kv_b_proj", (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), Kind.LINEAR, layer
        ),
        TensorSpec(f"{p}.o_proj", (h, nh * cfg.v_head_dim), Kind.LINEAR, layer),
    ]
    return specs


def layer_specs(cfg: ModelConfig, layer: int, with_experts: bool = True) -> list[TensorSpec]:
    """Every tensor of one decoder layer; routed experts only when `with_experts`."""
    p = layer_prefix(layer)
    h = cfg.hidden_size
    specs = [
        TensorSpec(f"{p}.input_layernorm", (h,), Kind.NORM, layer),
        TensorSpec(f"{p}.post_attention_layernorm", (h,), Kind.NORM, layer),
        *attention_specs(cfg, layer),
    ]
    if not cfg.is_moe_layer(layer):
        return specs + mlp_specs(f"{p}.mlp", h, cfg.intermediate_size, layer)
    specs += [
        TensorSpec(f"{p}.mlp.gate", (cfg.n_routed_experts, h), Kind.ROUTER, layer),
        TensorSpec(f"{p}.mlp.gate.e_score_correction_bias", (cfg.n_routed_experts,), Kind.BIAS, layer),
    ]
    if cfg.n_shared_experts:
        specs += mlp_specs(f"{p}.mlp.shared_experts", h, cfg.moe_intermediate_size * cfg.n_shared_experts, layer)
    if with_experts:
        for e in range(cfg.n_routed_experts):
            specs += expert_specs(cfg, layer, e)
    return specs


# the MTP layer's stored copies of the main model's embedding and output head (DeepSeek-V3 stores both physically)
MTP_COPIES = {"embed_tokens": "model.embed_tokens", "shared_head.head": "lm_head"}


def mtp_specs(cfg: ModelConfig, layer: int, with_experts: bool = True) -> list[TensorSpec]:
    """One multi-token-prediction layer (index num_hidden_layers + k): its embedding copy, enorm, hnorm,
    eh_proj [H, 2H], a full MoE decoder block, shared_head.norm and shared_head.head [V, H]."""
    p, h, v = layer_prefix(layer), cfg.hidden_size, cfg.vocab_size
    return [
        TensorSpec(f"{p}.embed_tokens", (v, h), Kind.EMBED, layer),
        TensorSpec(f"{p}.enorm", (h,), Kind.NORM, layer),
        TensorSpec(f"{p}.hnorm", (h,), Kind.NORM, layer),
        TensorSpec(f"{p}.eh_proj", (h, 2 * h), Kind.PROJ, layer),
        *layer_specs(cfg, layer, with_experts),
        TensorSpec(f"{p}.shared_head.norm", (h,), Kind.NORM, layer),
        TensorSpec(f"{p}.shared_head.head", (v, h), Kind.EMBED, layer),
    ]


def mtp_copy_source(spec: TensorSpec) -> str | None:
    """The main-model tensor an MTP tensor is a stored copy of (None for the MTP layer's own tensors)."""
    if spec.layer is None:
        return None
    return MTP_COPIES.get(spec.name.removeprefix(f"{layer_prefix(spec.layer)}."))


def model_specs(cfg: ModelConfig, with_experts: bool = True, mtp: bool = True) -> list[TensorSpec]:
    """Every tensor of the checkpoint: the main model, then the MTP layers the config declares (with `mtp`)."""
    specs = [TensorSpec("model.embed_tokens", (cfg.vocab_size, cfg.hidden_size), Kind.EMBED)]
    for layer in range(cfg.num_hidden_layers):
        specs += layer_specs(cfg, layer, with_experts)
    specs += [
        TensorSpec("model.norm", (cfg.hidden_size,), Kind.NORM),
        TensorSpec("lm_head", (cfg.vocab_size, cfg.hidden_size), Kind.EMBED),
    ]
    if mtp:
        for layer in cfg.mtp_layers:
            specs += mtp_specs(cfg, layer, with_experts)
    return specs


def stored_name(spec: TensorSpec) -> str:
    """The safetensors key: `<module>.weight`, except the router bias, which is stored under its own name."""
    return spec.name if spec.kind is Kind.BIAS else f"{spec.name}.weight"
