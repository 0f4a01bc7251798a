"""Reading safetensors checkpoints tensor by tensor, FP8 block scales, and errors that name the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from kernels.reference import weight_quant
from services.errors import CheckpointError
from services.expert.store import ExpertStore
from services.format.checkpoint import CheckpointReader
from services.format.model_writer import write_random_model
from services.format.presets import preset_config
from services.format.tensor_names import expert_specs, model_specs, stored_name
from services.format.weights import read_linear


def test_init_model_layout(tiny_fp8):
    cfg = json.loads((tiny_fp8 / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    index = json.loads((tiny_fp8 / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((tiny_fp8 / s).exists() for s in shards)
    assert index["metadata"]["total_size"] > 0
    reader = CheckpointReader(tiny_fp8)
    kv_a = reader.info("model.layers.1.self_attn.kv_a_proj_with_mqa.weight")
    assert kv_a.dtype == torch.float8_e4m3fn and kv_a.shape == (80, 320)
    assert reader.info("model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv").shape == (1, 3)
    assert reader.info("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    assert reader.info("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    assert reader.info("lm_head.weight").dtype == torch.bfloat16
    bias = reader.get("model.layers.1.mlp.gate.e_score_correction_bias")
    assert (bias > 0).any() and (bias < 0).any()
    tok = Tokenizer.from_file(str(tiny_fp8 / "tokenizer.json"))
    assert tok.encode("Hello world").ids[0] == 0  # BOS
    assert json.loads((tiny_fp8 / "generation_config.json").read_text())["eos_token_id"] == 1
    expected = {stored_name(s) for s in model_specs(reader.config)}
    assert expected <= set(reader.names())


def test_loading_two_experts_reads_nothing_else(tiny_fp8):
    reader = CheckpointReader(tiny_fp8)
    store = ExpertStore(reader)
    reads = []
    original = reader.get
    reader.get = lambda name, *a, **k: (reads.append(name), original(name, *a, **k))[1]
    store.load(1, 3)
    store.load(1, 7)
    wanted = {
        stored_name(s) + sfx for e in (3, 7) for s in expert_specs(reader.config, 1, e) for sfx in ("", "_scale_inv")
    }
    assert set(reads) == wanted and len(reads) == len(wanted)
    index = json.loads((tiny_fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(reader.opened_files) == {index[n] for n in wanted}
    assert len(set(index.values())) > len(set(reader.opened_files))  # other shards stayed closed
    assert store.loaded() == [(1, 3), (1, 7)]


def test_single_file_checkpoint(tmp_path, tiny_fp8):
    src = CheckpointReader(tiny_fp8)
    save_file({n: src.get(n) for n in src.names()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_fp8 / "config.json").read_text())
    single = CheckpointReader(tmp_path)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    assert torch.equal(single.get(name).view(torch.uint8), src.get(name).view(torch.uint8))


def test_partial_block_dequant_multiplies_scale_per_block():
    w = torch.randn(80, 320) * torch.linspace(0.1, 3.0, 320)  # columns in 3 blocks, the last one partial (64)
    q, s = weight_quant(w)
    assert s.shape == (1, 3)
    from kernels.reference import weight_dequant

    deq = weight_dequant(q, s)
    for j, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 320)]):
        assert torch.equal(deq[:, lo:hi], q[:, lo:hi].float() * s[0, j])  # multiply, per own block
    assert ((deq - w).abs() / w.abs().amax()).max() < 0.07


def _edited_copy(tmp_path, tiny_fp8, edit):
    reader = CheckpointReader(tiny_fp8)
    tensors = {n: reader.get(n) for n in reader.names()}
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_fp8 / "config.json").read_text())
    return CheckpointReader(tmp_path)


def test_missing_tensor_named(tmp_path, tiny_fp8):
    name = "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"
    reader = _edited_copy(tmp_path, tiny_fp8, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        ExpertStore(reader).load(1, 2)


def test_wrong_shape_named(tmp_path, tiny_fp8):
    name = "model.layers.1.mlp.experts.4.gate_proj.weight"
    reader = _edited_copy(tmp_path, tiny_fp8, lambda t: t.__setitem__(name, t[name][:50]))
    with pytest.raises(CheckpointError) as exc:
        ExpertStore(reader).load(1, 4)
    assert name in str(exc.value) and "shape" in str(exc.value)


def test_wrong_dtype_named(tmp_path, tiny_fp8):
    name = "model.layers.1.mlp.experts.4.gate_proj.weight"
    reader = _edited_copy(tmp_path, tiny_fp8, lambda t: t.__setitem__(name, t[name].to(torch.uint8)))
    with pytest.raises(CheckpointError) as exc:
        ExpertStore(reader).load(1, 4)
    assert name in str(exc.value) and "uint8" in str(exc.value)


def test_index_pointing_at_missing_shard_named(tmp_path):
    write_random_model(tmp_path, preset_config("tiny"), shard_bytes=256 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["lm_head.weight"]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        CheckpointReader(tmp_path)


def test_bf16_checkpoint_experts_quantized_at_load(tmp_path):
    write_random_model(tmp_path, preset_config("tiny", fp8=False), seed=1)
    reader = CheckpointReader(tmp_path)
    spec = expert_specs(reader.config, 1, 0)[0]
    raw = reader.get(stored_name(spec)).float()
    weights = ExpertStore(reader).load(1, 0)
    assert weights.gate.is_fp8 and weights.gate.weight.dtype == torch.float8_e4m3fn
    assert ((weights.gate.dense() - raw).abs().max() / raw.abs().max()) < 0.07
    assert not read_linear(reader, spec).is_fp8  # without the request it stays as stored
