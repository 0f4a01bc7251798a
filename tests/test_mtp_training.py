"""Training the MTP layer (services/training/mtp.py): the main model frozen and written back unchanged, the MTP
loss falls, and what is trained is what the serving engine's MTP layer computes (logits within 1e-4)."""

from __future__ import annotations

import pytest
import torch

from services.format.checkpoint import CheckpointReader
from services.format.presets import preset_config
from services.gateway.engine import Engine
from services.training.corpus import held_out_windows
from services.training.forward import TrainingModel
from services.training.mtp import final_hidden, mtp_logits, mtp_parameters, write_mtp_trained_model
from services.training.trainer import TrainConfig
from tests.test_mtp import _ours

SHORT = TrainConfig(steps=10, seq_len=64, batch=4, warmup=1, seed=5)


@pytest.fixture(scope="module")
def mtp_trained(tiny_fp8, tmp_path_factory):
    return write_mtp_trained_model(tiny_fp8, tmp_path_factory.mktemp("mtp-trained") / "model", SHORT)


def test_only_the_mtp_layer_trains_and_its_loss_falls(mtp_trained, tiny_fp8):
    losses = mtp_trained.losses
    assert len(losses) == SHORT.steps and sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    n = preset_config("tiny").num_hidden_layers
    with CheckpointReader(tiny_fp8) as before, CheckpointReader(mtp_trained.directory) as after:
        for name in before.names():
            same = torch.equal(before.get(name), after.get(name))
            mtp_own = name.startswith(f"model.layers.{n}.") and not name.startswith(
                (f"model.layers.{n}.embed_tokens", f"model.layers.{n}.shared_head.head")
            )
            if not mtp_own:
                assert same, f"{name} changed"
        assert not torch.equal(
            before.get(f"model.layers.{n}.eh_proj.weight"), after.get(f"model.layers.{n}.eh_proj.weight")
        )


def test_trained_mtp_layer_is_what_gets_served(mtp_trained):
    model_dir = mtp_trained.directory
    ids = held_out_windows(model_dir, length=40, per_module=1)[0]
    engine = Engine.from_dir(model_dir, cache_tokens=1024, block_size=16, mtp=True)
    _, served = _ours(engine, ids)  # [T-1, V]: the MTP layer's logits at pairs (h_i, t_{i+1})
    model = TrainingModel.from_checkpoint(model_dir)
    mtp_parameters(model)
    with torch.no_grad():
        x = torch.tensor([ids])
        trained = mtp_logits(model, final_hidden(model, x)[:, :-1], x[:, 1:])[0]
    diff = (trained - served).abs().max().item()
    assert diff <= 1e-4, f"max |dlogit| {diff:.3g}"
