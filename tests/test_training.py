"""The project's own trainer (services/training): its forward is the served model's, and training trains.

The training forward (naive MLA, no cache, autograd) against the serving engine (absorbed MLA over the paged
latent cache, experts through the in-process backend) on the same checkpoint, float32: every log-probability
of every position within 1e-4, on the random tiny preset and on trained ones (written back as FP8 blocks)."""

from __future__ import annotations

import json

import pytest
import torch

from services.attention.batch import SequenceChunk
from services.attention.kv_cache import SequenceBlocks
from services.format.checkpoint import CheckpointReader
from services.format.tensor_names import model_specs, stored_name
from services.gateway.engine import Engine
from services.training.corpus import HELD_OUT_MODULES, TRAIN_MODULES, held_out_windows
from services.training.forward import TrainingModel, bias_name
from services.training.trainer import TrainConfig, update_routing_bias, write_trained_model
from tests.model_steps import build_step

SHORT = TrainConfig(steps=8, seq_len=64, batch=4, warmup=1, seed=3)


@pytest.fixture(scope="module")
def short_trained(tmp_path_factory):
    """The tiny preset after a few steps: every weight moved, the routing biases too."""
    return write_trained_model(tmp_path_factory.mktemp("short-trained") / "model", "tiny", SHORT)


def _engine_logprobs(engine: Engine, ids: list[int]) -> torch.Tensor:
    seq = SequenceBlocks()
    try:
        batch = build_step([SequenceChunk(seq, ids)], engine.cache)
        return engine.model.forward(batch, engine.cache, all_logits=True).log_softmax(-1)  # [T, V]
    finally:
        engine.cache.release(seq)


def _assert_forward_is_served(model_dir, rows: list[list[int]]) -> None:
    engine = Engine.from_dir(model_dir, cache_tokens=4096, block_size=16)
    model = TrainingModel.from_checkpoint(model_dir)
    with torch.no_grad():
        ours = model.forward(torch.tensor(rows)).log_softmax(-1)  # [B, T, V]
    worst = max((ours[i] - _engine_logprobs(engine, ids)).abs().max().item() for i, ids in enumerate(rows))
    assert worst <= 1e-4, f"max |dlogprob| {worst:.3g}"
    scored = engine.score(rows[0])  # the engine's score path (chunked prefill through the scheduler) too
    chosen = ours[0, :-1].gather(1, torch.tensor(rows[0][1:])[:, None]).squeeze(1)
    assert max(abs(p.logprob - c) for p, c in zip(scored[1:], chosen.tolist())) <= 1e-4


def _random_rows(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 1024, (n, length), generator=g).tolist()


def test_training_forward_equals_serving_on_the_random_tiny_preset(tiny_fp8):
    _assert_forward_is_served(tiny_fp8, _random_rows(3, 96))


def test_training_forward_equals_serving_after_training(short_trained):
    _assert_forward_is_served(short_trained.directory, held_out_windows(short_trained.directory)[:3])


@pytest.mark.slow
@pytest.mark.timeout(900)  # the fixture trains 200 steps first
def test_training_forward_equals_serving_on_the_trained_test_model(tiny_trained_fp8):
    windows = held_out_windows(tiny_trained_fp8)
    _assert_forward_is_served(tiny_trained_fp8, windows[:4] + _random_rows(1, 64))


def test_loss_falls(short_trained):
    losses = short_trained.losses
    assert len(losses) == SHORT.steps and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses


def test_trained_checkpoint_layout(short_trained, tiny_fp8):
    """The real layout: FP8 projections with their scales, the start's tokenizer; changed weights; the MTP
    layers' stored copies of the embedding and head (when the preset has MTP layers) equal the trained originals."""
    d = short_trained.directory
    assert "quantization_config" in json.loads((d / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (d / name).read_bytes() == (tiny_fp8 / name).read_bytes()
    with CheckpointReader(d) as trained, CheckpointReader(tiny_fp8) as start:
        cfg = trained.config
        assert sorted(trained.names()) == sorted(start.names())
        assert trained.get("model.layers.1.self_attn.q_b_proj.weight").dtype == torch.float8_e4m3fn
        for name in ("model.embed_tokens.weight", "model.layers.1.mlp.experts.3.up_proj.weight", bias_name(1)):
            assert not torch.equal(trained.get(name).float(), start.get(name).float()), name
        for spec in model_specs(cfg):
            local = spec.name.removeprefix(f"model.layers.{spec.layer}.")
            if (
                spec.layer is not None
                and spec.layer >= cfg.num_hidden_layers
                and local in ("embed_tokens", "shared_head.head")
            ):
                original = "model.embed_tokens.weight" if local == "embed_tokens" else "lm_head.weight"
                assert torch.equal(trained.get(stored_name(spec)), trained.get(original))


def test_routing_bias_follows_load(tiny_fp8):
    """Auxiliary-loss-free balancing: the bias rises for experts below the mean load, falls above it."""
    model = TrainingModel.from_checkpoint(tiny_fp8)
    before = model.params[bias_name(1)].clone()
    counts = torch.zeros(16, dtype=torch.int64)
    counts[0], counts[1] = 10, 2  # mean 0.75
    update_routing_bias(model, {1: counts}, 0.01)
    delta = model.params[bias_name(1)] - before
    assert delta[0].item() == pytest.approx(-0.01) and delta[1].item() == pytest.approx(-0.01)
    assert torch.allclose(delta[2:], torch.full((14,), 0.01))
    assert not model.params[bias_name(1)].requires_grad


def test_the_corpus_holds_modules_out():
    assert not set(TRAIN_MODULES) & set(HELD_OUT_MODULES)


def test_a_tokenizer_learned_from_the_corpus(tmp_path, tiny_fp8):
    """The demo's tokenizer: init-model's special tokens in their places, merges from the stdlib source."""
    import shutil

    from services.format.tokenizer import ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN, load_tokenizer
    from services.training.corpus import module_source
    from services.training.tokenizer import replace_tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_fp8 / name, tmp_path / name)
    tok = replace_tokenizer(tmp_path, 1024, [module_source(m) for m in TRAIN_MODULES])
    assert load_tokenizer(tmp_path).to_str() == tok.to_str()
    assert tok.get_vocab_size() == 1024
    assert [tok.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)] == [0, 1, 1022, 1023]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert {int(i): e["content"] for i, e in config["added_tokens_decoder"].items()} == {
        0: BOS_TOKEN,
        1: EOS_TOKEN,
        1022: USER_TOKEN,
        1023: ASSISTANT_TOKEN,
    }
    held_out = module_source(HELD_OUT_MODULES[1])
    ids = tok.encode(held_out, add_special_tokens=False).ids
    assert len(held_out) / len(ids) > 2.5  # init-model's tokenizer: about 1.3 characters per token
    assert tok.decode(ids) == held_out and tok.encode("x").ids[0] == 0  # round trip; BOS first
