"""Logit parity with the real Hugging Face `DeepseekV3ForCausalLM` (float32, CPU) on checkpoints made by
init-model's writer; the reference loads the dequantized weights.

The tiny preset covers: partial 128-blocks (hidden 320, kv_a_proj 80 rows), n_group 4 choosing topk_group 2,
a dense layer, 2 shared experts, YaRN (factor 40), FP8 weights. The variant covers the other branches:
BF16 weights quantized to FP8 at load, q_proj without q_lora, one group, no RoPE scaling, no dense layer,
and transformers 5.x's config spelling.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from services.attention.batch import SequenceChunk
from services.attention.kv_cache import SequenceBlocks
from services.format.convert import dequantize_checkpoint
from services.format.model_writer import write_random_model
from services.format.presets import preset_config
from services.gateway.engine import Engine
from services.gateway.sampling import SamplingParams
from tests.conftest import load_hf
from tests.model_steps import build_step

PREFILL, DECODE = 40, 16


def _variant_dir(tmp_path_factory):
    cfg = replace(
        preset_config("tiny", fp8=False),
        q_lora_rank=None,
        n_group=1,
        topk_group=1,
        yarn=None,
        first_k_dense_replace=0,
        n_shared_experts=1,
    )
    return write_random_model(tmp_path_factory.mktemp("variant"), cfg, seed=7, spelling="transformers")


@pytest.fixture(scope="module", params=["tiny-fp8", "variant-bf16"])
def pair(request, tiny_fp8, tiny_fp8_dense, tmp_path_factory):
    """(engine, HF reference model) on the same weights."""
    if request.param == "tiny-fp8":
        src, dense = tiny_fp8, tiny_fp8_dense
    else:
        src = _variant_dir(tmp_path_factory)
        # The engine quantizes a BF16 checkpoint's routed experts to FP8 at load; the reference gets exactly
        # those weights: a copy whose expert tensors are FP8-quantized, then dequantized.
        mixed = _experts_quantized_copy(src, tmp_path_factory.mktemp("variant-mixed"))
        dense = dequantize_checkpoint(mixed, tmp_path_factory.mktemp("variant-mixed-f32"), torch.float32)
    return Engine.from_dir(src, cache_tokens=2048, block_size=16), load_hf(dense)


def _experts_quantized_copy(src, dst):
    from services.format.checkpoint import CheckpointReader
    from services.format.model_writer import write_checkpoint
    from services.format.tensor_names import model_specs, stored_name
    from services.format.weights import read_linear

    with CheckpointReader(src) as reader:

        def tensors():
            for spec in model_specs(reader.config):
                name = stored_name(spec)
                if spec.expert is None:
                    yield name, reader.get(name)
                    continue
                lw = read_linear(reader, spec, quantize_fp8=True)
                yield name, lw.weight
                yield name + "_scale_inv", lw.scale_inv

        dst.mkdir(parents=True, exist_ok=True)
        reader.config.write(dst, "transformers")
        write_checkpoint(dst, tensors())
    return dst


def _tokens(n, seed=0, vocab=1024):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n,), generator=g).tolist()


def test_prefill_and_cached_decode_logprobs_match(pair):
    engine, hf = pair
    ids = _tokens(PREFILL + DECODE)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)  # [N, V]
    seq = SequenceBlocks()
    try:
        batch = build_step([SequenceChunk(seq, ids[:PREFILL])], engine.cache)
        ours = [engine.model.forward(batch, engine.cache, all_logits=True).log_softmax(-1)]
        for i in range(PREFILL, PREFILL + DECODE):  # one token at a time through the latent cache
            batch = build_step([SequenceChunk(seq, [ids[i]])], engine.cache)
            ours.append(engine.model.forward(batch, engine.cache).log_softmax(-1))
    finally:
        engine.cache.release(seq)
    ours = torch.cat(ours)  # [N, V]
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"max |dlogprob| {diff:.3g}"
    decode_diff = (ours[PREFILL:] - ref[PREFILL:]).abs().max().item()
    assert decode_diff <= 1e-4, f"decode max |dlogprob| {decode_diff:.3g}"


def test_greedy_tokens_identical_over_32_steps(pair):
    engine, hf = pair
    prompt = _tokens(12, seed=1)
    ours = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0].token_ids
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            min_new_tokens=32,
        )
    theirs = out[0, len(prompt) :].tolist()
    assert len(ours) == 32
    assert ours == theirs


def test_routing_indices_identical(pair):
    engine, hf = pair
    ids = _tokens(48, seed=2)
    captured = {}
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "e_score_correction_bias"):
            hooks.append(gate.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[2].clone())))
    try:
        with torch.no_grad():
            hf(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    trace = []
    seq = SequenceBlocks()
    try:
        engine.model.forward(build_step([SequenceChunk(seq, ids)], engine.cache), engine.cache, routing_trace=trace)
    finally:
        engine.cache.release(seq)
    assert [layer for layer, _ in trace] == sorted(captured)
    for layer, idx in trace:
        assert torch.equal(idx.sort(-1).values, captured[layer].sort(-1).values), f"layer {layer}"
