"""The demo model (`expertmesh init-model DIR --preset demo`, the README's main job): the tiny preset's
architecture, trained about a minute on a 2-core machine on the Python standard library's source, with a tokenizer
learned from that source (services/training/tokenizer.py)."""

from __future__ import annotations

from pathlib import Path

# no torch at import: the CLI reads the preset's name before deciding to train

DEMO_PRESET = "demo"
DEMO_ARCHITECTURE = "tiny"
DEMO_STEPS = 200


def demo_description(steps: int) -> str:
    return (
        f"a tiny DeepSeek-V3-architecture model trained {steps} steps on the Python standard library's source; "
        "it completes Python-like text, nothing more"
    )


def write_demo_model(directory: str | Path, seed: int = 0, fp8: bool = True, steps: int = DEMO_STEPS, on_step=None):
    """-> trainer.TrainResult. `on_step(step, steps, loss)` after every step."""
    from services.training.trainer import TrainConfig, write_trained_model

    tc = TrainConfig(steps=steps, seed=seed, learn_tokenizer=True)
    return write_trained_model(directory, DEMO_ARCHITECTURE, tc, on_step, fp8=fp8)
