"""Model presets for `expertmesh init-model`: real DeepSeek-V3 architecture, small sizes.

tiny:  tests. Hidden 320 and kv_a 80 rows leave partial 128-blocks; 4 groups choosing 2; 1 dense layer;
       2 shared experts; YaRN (factor 40) on.
deep:  tiny's widths with 24 layers (a layer is ~4% of a step, as one of DeepSeek-V3's 61 is ~2%): benchmarks
       of what costs one layer more or less, such as MTP's draft pass.
small: benchmarks (~100M parameters): hidden 512, 8 layers with 2 dense, 64 routed experts top-6 in 8 groups.
Every preset has DeepSeek-V3's multi-token-prediction layer (num_nextn_predict_layers 1, index num_hidden_layers).
"""

from __future__ import annotations

from services.format.config import Fp8Quantization, ModelConfig, YarnScaling

TINY = dict(
    vocab_size=1024,
    hidden_size=320,
    intermediate_size=448,
    moe_intermediate_size=96,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    q_lora_rank=96,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    n_shared_experts=2,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
)

PRESETS: dict[str, dict] = {
    "tiny": TINY,
    "deep": {**TINY, "num_hidden_layers": 24},
    "small": dict(
        vocab_size=16384,
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=128,
        num_hidden_layers=8,
        first_k_dense_replace=2,
        num_attention_heads=8,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=64,
        n_shared_experts=1,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=4,
    ),
}


def preset_config(name: str, fp8: bool = True) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    cfg = ModelConfig(
        **{"num_nextn_predict_layers": 1, **PRESETS[name]},  # DeepSeek-V3's one MTP layer, unless the preset says
        routed_scaling_factor=2.5,
        max_position_embeddings=163840,
        yarn=YarnScaling(),
        quantization=Fp8Quantization() if fp8 else None,
        dtype="bfloat16",
    )
    cfg.validate()
    return cfg
