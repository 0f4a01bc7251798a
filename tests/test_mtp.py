"""The MTP layer as the checkpoint stores it (layer index num_hidden_layers): written by init-model, read lazily
and checked, placed and load-tracked like every MoE layer, and its logits against an independent plain-torch
reference of DeepSeek-V3's formula over the checkpoint's own (dequantized) tensors."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from services.attention.batch import SequenceChunk
from services.attention.kv_cache import PagedLatentCache, SequenceBlocks
from services.errors import CheckpointError, ConfigError
from services.expert.local import LocalExperts
from services.expert.store import ExpertStore
from services.format.checkpoint import CheckpointReader
from services.format.model_writer import write_checkpoint, write_random_model
from services.format.presets import preset_config
from services.format.tensor_names import mtp_specs, stored_name
from services.gateway.engine import Engine
from services.state.placement import Placement, Pool
from tests.conftest import load_hf
from tests.model_steps import build_step

T = 24  # prompt positions in the parity test


@pytest.fixture(scope="module")
def engine_mtp(tiny_fp8):
    return Engine.from_dir(tiny_fp8, cache_tokens=1024, block_size=16, mtp=True)


def test_init_model_writes_the_mtp_layer_as_deepseek_stores_it(tiny_fp8):
    cfg = preset_config("tiny")
    assert cfg.num_nextn_predict_layers == 1 and cfg.mtp_layers == [cfg.num_hidden_layers]
    with CheckpointReader(tiny_fp8) as reader:
        n, h = cfg.num_hidden_layers, cfg.hidden_size
        for spec in mtp_specs(reader.config, n):
            assert stored_name(spec) in reader, stored_name(spec)
        eh = reader.get(f"model.layers.{n}.eh_proj.weight")
        assert eh.shape == (h, 2 * h) and eh.dtype == torch.bfloat16  # BF16, never FP8
        assert reader.get(f"model.layers.{n}.self_attn.q_a_proj.weight").dtype == torch.float8_e4m3fn
        assert reader.get(f"model.layers.{n}.mlp.experts.3.down_proj.weight").dtype == torch.float8_e4m3fn
        assert f"model.layers.{n}.mlp.experts.3.down_proj.weight_scale_inv" in reader
        assert reader.get(f"model.layers.{n}.mlp.gate.e_score_correction_bias").dtype == torch.float32
        # stored copies of the main embedding and head, as in DeepSeek-V3's checkpoint
        assert torch.equal(reader.get(f"model.layers.{n}.embed_tokens.weight"), reader.get("model.embed_tokens.weight"))
        assert torch.equal(reader.get(f"model.layers.{n}.shared_head.head.weight"), reader.get("lm_head.weight"))


def test_the_mtp_layer_is_placed_load_tracked_and_held_like_any_moe_layer(tiny_fp8):
    cfg = preset_config("tiny")
    n = cfg.num_hidden_layers
    assert cfg.moe_layers == [1, 2, n]
    placement = Placement.spread(cfg, [Pool("pool-0", "a:1"), Pool("pool-1", "b:2")])
    assert placement.layers == cfg.moe_layers
    placement.validate(cfg.moe_layers, cfg.n_routed_experts)
    assert any(layer == n for layer, _ in placement.experts_on("pool-1"))
    store = ExpertStore(CheckpointReader(tiny_fp8))
    store.check(n, cfg.n_routed_experts - 1)
    experts = LocalExperts.load_all(store, layers=[n])
    assert store.loaded() == [(n, e) for e in range(cfg.n_routed_experts)]
    hidden = torch.randn(5, cfg.hidden_size)
    idx = torch.tensor([[0, 1, 2, 3]] * 5)
    out = experts.start(n, hidden, idx, torch.full((5, 4), 0.25))()
    assert out.shape == hidden.shape and torch.isfinite(out).all()


def test_the_latent_cache_has_one_more_layer_for_mtp():
    cfg = preset_config("tiny")
    assert PagedLatentCache(cfg, 4, 16).data.shape[0] == cfg.num_hidden_layers
    assert PagedLatentCache(cfg, 4, 16, mtp=True).data.shape[0] == cfg.num_hidden_layers + 1


def test_mtp_asked_of_a_checkpoint_without_its_weights_names_the_missing_tensor(tiny_fp8, tmp_path):
    n = preset_config("tiny").num_hidden_layers
    with CheckpointReader(tiny_fp8) as reader:
        write_checkpoint(
            tmp_path, ((name, reader.get(name)) for name in reader.names() if not name.startswith(f"model.layers.{n}."))
        )
        reader.config.write(tmp_path)
    with pytest.raises(CheckpointError) as err:
        Engine.from_dir(tmp_path, cache_tokens=256, block_size=16, mtp=True)
    assert err.value.tensor == f"model.layers.{n}.embed_tokens.weight"
    assert "num_nextn_predict_layers 1" in str(err.value) and "without MTP" in str(err.value)
    engine = Engine.from_dir(tmp_path, cache_tokens=256, block_size=16)  # without MTP it serves
    assert len(engine.generate([[5, 6, 7]], _greedy(4))[0].token_ids) == 4


def test_mtp_asked_of_a_model_without_an_mtp_layer_is_a_config_error(tmp_path):
    cfg = replace(preset_config("tiny"), num_nextn_predict_layers=0, num_hidden_layers=2)
    write_random_model(tmp_path, cfg, seed=3)
    with pytest.raises(ConfigError, match="num_nextn_predict_layers"):
        Engine.from_dir(tmp_path, cache_tokens=256, block_size=16, mtp=True)


def test_mtp_logits_match_an_independent_reference(engine_mtp, tiny_fp8_dense):
    """h_i from transformers' DeepseekV3Model (after the final norm); the MTP layer from DeepSeek-V3's formula in
    plain fp32 torch over the dequantized checkpoint; ours end to end (main forward, then the MTP layer)."""
    ids = torch.randint(2, 1024, (T,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        h_ref = load_hf(tiny_fp8_dense).model(torch.tensor([ids])).last_hidden_state[0]  # [T, H]
    h_ours, ours = _ours(engine_mtp, ids)
    assert (h_ours - h_ref).abs().max().item() <= 1e-4
    with CheckpointReader(tiny_fp8_dense) as reader:
        ref = _reference_mtp(reader, h_ref[:-1], ids[1:])  # pairs (h_i, t_{i+1}), i = 0..T-2
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"max |dlogit| {diff:.3g}"
    assert ours.std().item() > 0.5  # logits that say something, not a degenerate zero


def test_feeding_the_mtp_cache_writes_what_the_whole_layer_writes(engine_mtp):
    """`MTPModule.feed` (cache entries only, for positions after which no guess is wanted) writes the entries the
    whole layer writes: the guess at the last position, read over fed entries, equals the whole layer's there."""
    from services.gateway.model import run_interleaved

    ids = torch.randint(2, 1024, (T,), generator=torch.Generator().manual_seed(6)).tolist()
    hidden, whole = _ours(engine_mtp, ids)  # [T, H] main hidden states; [T - 1, V] the layer over every pair
    model, cache, mtp = engine_mtp.model, engine_mtp.cache, engine_mtp.core.runner.drafter.mtp
    seq = SequenceBlocks()
    try:
        cache.reserve(seq, len(ids))
        seq.length = len(ids)
        mtp.feed(
            model, build_step([SequenceChunk(SequenceBlocks(seq.blocks, 0), ids[1:-1])], cache), cache, hidden[:-2]
        )
        last = build_step([SequenceChunk(SequenceBlocks(seq.blocks, T - 2), ids[-1:])], cache)
        fed = run_interleaved([mtp.forward_stages(model, last, cache, hidden[-2:-1], torch.tensor([0]))])[0]
    finally:
        cache.release(seq)
    assert (fed[0] - whole[-1]).abs().max().item() <= 1e-5
    assert (fed[0] - whole[-2]).abs().max().item() > 1e-2  # a different position's guess is not the same


def _greedy(n):
    from services.gateway.sampling import SamplingParams

    return SamplingParams(max_tokens=n, ignore_eos=True)


def _ours(engine, ids):
    from services.gateway.model import run_interleaved

    model, cache, mtp = engine.model, engine.cache, engine.core.runner.drafter.mtp
    seq = SequenceBlocks()
    try:
        batch = build_step([SequenceChunk(seq, ids)], cache)
        every = torch.arange(len(ids))
        _, hidden = run_interleaved([model.forward_stages(batch, cache, logit_index=every, hidden_index=every)])[0]
        pairs = build_step([SequenceChunk(SequenceBlocks(seq.blocks, 0), ids[1:])], cache)
        logits = run_interleaved([mtp.forward_stages(model, pairs, cache, hidden[:-1], torch.arange(len(ids) - 1))])[0]
    finally:
        cache.release(seq)
    return hidden, logits


# ---- the reference: DeepSeek-V3's MTP layer in plain fp32 torch -----------------------------------------------
def _reference_mtp(reader, h, next_ids):
    cfg = reader.config
    p = f"model.layers.{cfg.num_hidden_layers}."

    def w(name):
        return reader.get(p + name + ".weight").float()

    x = torch.cat((_rms(w("embed_tokens")[next_ids], w("enorm")), _rms(h, w("hnorm"))), dim=-1) @ w("eh_proj").T
    x = x + _attention(cfg, w, _rms(x, w("input_layernorm")))
    x = x + _moe(cfg, reader, p, _rms(x, w("post_attention_layernorm")))
    return _rms(x, w("shared_head.norm")) @ w("shared_head.head").T  # [T, V]


def _rms(x, weight, eps=1e-6):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, positions, cfg):
    """x [T, ..., R]: interleaved pairs (x[2j], x[2j+1]) rotated by YaRN frequencies (DeepSeek's
    precompute_freqs_cis with its correction range, beta_fast 32 / beta_slow 1)."""
    dim, base, y = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.yarn
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    def corr(rot):
        return dim * math.log(y.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(y.beta_fast)), 0), min(math.ceil(corr(y.beta_slow)), dim - 1)
    smooth = 1 - ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    freqs = freqs / y.factor * (1 - smooth) + freqs * smooth
    angle = positions[:, None].double() * freqs[None]  # [T, R/2]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (dim // 2,)
    c, s = angle.cos().float().view(shape), angle.sin().float().view(shape)
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def _attention(cfg, w, x):
    """Naive MLA over the whole sequence, causal: positions 0..T-1."""
    t, nh, dn, dr, dv, c = (
        x.shape[0],
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )
    pos = torch.arange(t)
    q = _rms(x @ w("self_attn.q_a_proj").T, w("self_attn.q_a_layernorm")) @ w("self_attn.q_b_proj").T
    q = q.view(t, nh, dn + dr)
    kv_a = x @ w("self_attn.kv_a_proj_with_mqa").T  # [T, C + R]
    kv = (_rms(kv_a[:, :c], w("self_attn.kv_a_layernorm")) @ w("self_attn.kv_b_proj").T).view(t, nh, dn + dv)
    k_pe = _rope(kv_a[:, c:], pos, cfg)  # [T, R], one head shared by all
    k = torch.cat((kv[..., :dn], k_pe[:, None, :].expand(t, nh, dr)), dim=-1)  # [T, nh, dn + dr]
    q = torch.cat((q[..., :dn], _rope(q[..., dn:], pos, cfg)), dim=-1)
    mscale = 0.1 * cfg.yarn.mscale_all_dim * math.log(cfg.yarn.factor) + 1
    scores = torch.einsum("shd,lhd->hsl", q, k) * (dn + dr) ** -0.5 * mscale**2
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("hsl,lhd->shd", scores.softmax(-1), kv[..., dn:])  # [T, nh, dv]
    return out.reshape(t, nh * dv) @ w("self_attn.o_proj").T


def _moe(cfg, reader, p, x):
    def lin(name):
        return reader.get(p + name + ".weight").float()

    def mlp(prefix, v):
        return (torch.nn.functional.silu(v @ lin(prefix + ".gate_proj").T) * (v @ lin(prefix + ".up_proj").T)) @ lin(
            prefix + ".down_proj"
        ).T

    scores = (x @ lin("mlp.gate").T).sigmoid()  # [T, E]
    choice = scores + reader.get(p + "mlp.gate.e_score_correction_bias").float()
    groups = choice.view(x.shape[0], cfg.n_group, -1)
    best = groups.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros(x.shape[0], cfg.n_group, dtype=torch.bool).scatter_(1, best, True)
    idx = groups.masked_fill(~keep[..., None], float("-inf")).view(x.shape[0], -1).topk(cfg.num_experts_per_tok).indices
    weights = scores.gather(1, idx)
    weights = weights / weights.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    out = mlp("mlp.shared_experts", x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            out[t] += weights[t, k] * mlp(f"mlp.experts.{int(idx[t, k])}", x[t : t + 1])[0]
    return out
