"""ModelConfig from config.json: both spellings, derived values, and rejection of what is not supported."""

from __future__ import annotations

import json
import math

import pytest

from services.errors import ConfigError
from services.format.config import ModelConfig
from services.format.presets import preset_config


def _write(tmp_path, d):
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


def test_both_spellings_read_the_same(tmp_path):
    cfg = preset_config("tiny")
    a = ModelConfig.from_dict(cfg.to_hf_dict("deepseek"))
    b = ModelConfig.from_dict(cfg.to_hf_dict("transformers"))
    assert a == b == cfg
    assert "rope_scaling" in cfg.to_hf_dict("deepseek") and "rope_parameters" in cfg.to_hf_dict("transformers")


def test_reads_what_transformers_itself_writes(tmp_path):
    from transformers import DeepseekV3Config

    hf = DeepseekV3Config(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        max_position_embeddings=163840,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_file(tmp_path)
    assert cfg.hidden_size == 256 and cfg.n_group == 4 and cfg.yarn.factor == 40.0
    # the reference notes' value for this config: 48^-0.5 * (1 + 0.1 ln 40)^2
    assert math.isclose(cfg.softmax_scale, 0.270468, rel_tol=1e-5)


def test_deepseek_v3_softmax_scale():
    d = preset_config("tiny").to_hf_dict()
    d.update(qk_nope_head_dim=128, qk_rope_head_dim=64)
    assert math.isclose(ModelConfig.from_dict(d).softmax_scale, 0.1352338, rel_tol=1e-6)


@pytest.mark.parametrize(
    "key,value",
    [
        ("scoring_func", "softmax"),
        ("hidden_act", "gelu"),
        ("topk_method", "greedy"),
        ("model_type", "llama"),
        ("moe_layer_freq", 2),
        ("tie_word_embeddings", True),
        ("n_group", 3),
        ("topk_group", 9),
        ("num_key_value_heads", 1),
        ("hidden_size", "wide"),
    ],
)
def test_unsupported_values_name_the_key(key, value):
    d = preset_config("tiny").to_hf_dict()
    d[key] = value
    with pytest.raises(ConfigError) as exc:
        ModelConfig.from_dict(d)
    assert key in str(exc.value)


def test_unsupported_rope_and_quantization_name_the_key():
    d = preset_config("tiny").to_hf_dict()
    d["rope_scaling"] = {"type": "linear", "factor": 2.0}
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig.from_dict(d)
    d = preset_config("tiny").to_hf_dict()
    d["quantization_config"]["quant_method"] = "awq"
    with pytest.raises(ConfigError, match="quant_method"):
        ModelConfig.from_dict(d)
    d = preset_config("tiny").to_hf_dict()
    d["quantization_config"]["weight_block_size"] = [64, 64]
    with pytest.raises(ConfigError, match="weight_block_size"):
        ModelConfig.from_dict(d)


def test_missing_key_and_missing_file(tmp_path):
    d = preset_config("tiny").to_hf_dict()
    del d["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelConfig.from_file(_write(tmp_path, d))
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_file(tmp_path / "nowhere")
