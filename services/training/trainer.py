"""Training a DeepSeek-V3-architecture model on the standard library's source, and writing it as a checkpoint.

The random start is the project's own (`write_random_model`: FP8 projections, the byte-level BPE tokenizer),
read back dequantized to float32; AdamW trains every tensor but the routing biases, which follow DeepSeek-V3's
auxiliary-loss-free balancing instead (after each step, each layer's bias rises by `bias_rate` for the experts
that got fewer tokens than average and falls for those that got more). The result is written in the real
checkpoint layout, projections as FP8 blocks (`model_writer.checkpoint_tensors`), with the start's tokenizer, or
with `learn_tokenizer` one whose merges are learned from the training modules (services/training/tokenizer.py).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.format.model_writer import checkpoint_tensors, write_checkpoint, write_random_model
from services.format.presets import preset_config
from services.training.corpus import TRAIN_MODULES, corpus_ids, held_out_windows, module_source
from services.training.forward import TrainingModel, bias_name
from services.training.tokenizer import replace_tokenizer

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
# (step, steps, loss) after every step
StepFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    seq_len: int = 128
    batch: int = 16
    lr: float = 4e-3  # peak; `warmup` steps up to it, then a linear decay to a tenth of it
    warmup: int = 20
    seed: int = 0
    bias_rate: float = 1e-3  # DeepSeek-V3's gamma for the routing biases (0: keep them as they are)
    learn_tokenizer: bool = False  # merges learned from the training modules instead of init-model's tokenizer


@dataclass
class TrainResult:
    directory: Path
    steps: int
    losses: list[float]  # per step
    seconds: float  # training alone (no writing)
    held_out_loss: float | None = None  # mean next-token loss on HELD_OUT_MODULES' opening windows, after training


def learning_rate(tc: TrainConfig, step: int) -> float:
    return tc.lr * min(1.0, (step + 1) / tc.warmup) * (0.1 + 0.9 * (1 - step / tc.steps))


def train(model: TrainingModel, ids: torch.Tensor, tc: TrainConfig, on_step: StepFn | None = None) -> list[float]:
    """`tc.steps` AdamW steps on random `seq_len`-token windows of ids [N]. -> the loss of every step."""
    if ids.numel() <= tc.seq_len + 1:
        raise ValueError(f"the corpus ({ids.numel()} tokens) is shorter than one window of {tc.seq_len + 1}")
    torch.manual_seed(tc.seed)
    opt = torch.optim.AdamW(model.trainable(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(tc.seed)
    losses = []
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(tc, step)
        starts = torch.randint(0, ids.numel() - tc.seq_len - 1, (tc.batch,), generator=gen)
        x = torch.stack([ids[i : i + tc.seq_len] for i in starts.tolist()])  # [B, T]
        loads: dict[int, torch.Tensor] = {}
        loss = model.loss(x, loads)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_routing_bias(model, loads, tc.bias_rate)
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, tc.steps, losses[-1])
    return losses


@torch.no_grad()
def update_routing_bias(model: TrainingModel, loads: dict[int, torch.Tensor], rate: float) -> None:
    """Auxiliary-loss-free balancing: b_i += rate * sign(mean load - load_i), per MoE layer."""
    if not rate:
        return
    for layer, counts in loads.items():
        counts = counts.to(torch.float32)
        model.params[bias_name(layer)].add_(rate * torch.sign(counts.mean() - counts))


def write_model(model: TrainingModel, directory: Path, side_files_from: Path) -> Path:
    """The model's current weights in the checkpoint layout (FP8 projections when its config says so), with
    config.json and the side files (tokenizer, generation config) of `side_files_from`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fp8 = model.cfg.quantization is not None
    model.cfg.write(directory)
    write_checkpoint(
        directory, (pair for spec in model.specs for pair in checkpoint_tensors(spec, model.stored_value(spec), fp8))
    )
    for name in SIDE_FILES:
        shutil.copy(Path(side_files_from) / name, directory / name)
    return directory


def write_trained_model(
    directory: str | Path,
    preset: str = "tiny",
    tc: TrainConfig = TrainConfig(),
    on_step: StepFn | None = None,
    fp8: bool = True,
) -> TrainResult:
    """A random `preset` model (seed `tc.seed`), trained `tc.steps` steps on TRAIN_MODULES, written to
    `directory` in the checkpoint layout (FP8 projections, or BF16 without `fp8`)."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory(prefix="expertmesh-train-") as tmp:
        start = write_random_model(Path(tmp) / "start", preset_config(preset, fp8=fp8), seed=tc.seed)
        if tc.learn_tokenizer:
            replace_tokenizer(start, preset_config(preset).vocab_size, [module_source(m) for m in TRAIN_MODULES])
        model = TrainingModel.from_checkpoint(start)
        ids = torch.tensor([t for module in corpus_ids(start, TRAIN_MODULES) for t in module])  # [N]
        began = time.perf_counter()
        losses = train(model, ids, tc, on_step)
        seconds = time.perf_counter() - began
        held_out = held_out_loss(model, held_out_windows(start))
        write_model(model, directory, start)
    return TrainResult(directory, tc.steps, losses, seconds, held_out)


@torch.no_grad()
def held_out_loss(model: TrainingModel, windows: list[list[int]]) -> float:
    """Mean next-token cross-entropy (nats) over equal-length token windows."""
    return model.loss(torch.tensor(windows)).item()
