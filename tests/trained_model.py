"""A test model with trained margins: the tiny preset, trained for a minute on Python source, in the real
FP8 checkpoint format.

Random weights make a model whose top-1 choices are coin flips between near-ties (10.6% of the random tiny
model's positions have a top-1/top-2 gap under 0.1 nat), so any perturbation of the arithmetic, fp8 dispatch
included, flips some of them. Trained models are what gets served; this one learns its margins from data
instead of having them chosen. It is made by the project's own trainer (services/training: the random start
from init-model's writer, a differentiable forward held to the serving engine's logits, AdamW), and written
back as FP8 blocks with `model_writer.checkpoint_tensors`.

The corpus is the Python standard library's own source (services/training/corpus.py), byte-level BPE tokens of
the model's tokenizer; scoring uses modules held out of training.
"""

from __future__ import annotations

from pathlib import Path

from services.training.corpus import HELD_OUT_MODULES, TRAIN_MODULES, corpus_ids, held_out_windows, module_source
from services.training.trainer import TrainConfig
from services.training.trainer import write_trained_model as train_and_write

__all__ = [
    "HELD_OUT_MODULES",
    "TRAIN_MODULES",
    "corpus_ids",
    "held_out_windows",
    "module_source",
    "write_trained_model",
]


def write_trained_model(
    directory: Path,
    preset: str = "tiny",
    steps: int = 200,
    seq_len: int = 128,
    batch: int = 16,
    lr: float = 4e-3,
    seed: int = 0,
) -> Path:
    tc = TrainConfig(steps=steps, seq_len=seq_len, batch=batch, lr=lr, seed=seed)
    return train_and_write(directory, preset, tc).directory
