"""A test model with trained margins: the tiny preset, trained for a minute on Python source, in the real
FP8 checkpoint format.

Random weights make a model whose top-1 choices are coin flips between near-ties (10.6% of the random tiny
model's positions have a top-1/top-2 gap under 0.1 nat), so any perturbation of the arithmetic, fp8 dispatch
included, flips some of them. Trained models are what gets served; this one learns its margins from data
instead of having them chosen. It is made the way every test model is: the project's own writer makes the
random start, the Hugging Face implementation trains it (it has a backward pass; our engine serves only),
and the trained weights are written back as FP8 blocks with `model_writer.checkpoint_tensors`.

The corpus is the Python standard library's own source (present wherever Python is: no download), byte-level
BPE tokens of the model's tokenizer; scoring uses modules held out of training.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import torch

from services.format.config import ModelConfig
from services.format.convert import SIDE_FILES, dequantize_checkpoint
from services.format.model_writer import checkpoint_tensors, write_checkpoint, write_random_model
from services.format.presets import preset_config
from services.format.tensor_names import TensorSpec, model_specs, stored_name
from services.format.tokenizer import load_tokenizer

TRAIN_MODULES = ("argparse", "textwrap", "dataclasses", "functools", "inspect", "typing", "enum", "pathlib")
HELD_OUT_MODULES = ("json.decoder", "csv", "shlex", "string", "heapq", "bisect", "fnmatch", "glob")


def module_source(name: str) -> str:
    return Path(importlib.import_module(name).__file__).read_text()


def corpus_ids(model_dir: Path, modules: tuple[str, ...]) -> list[list[int]]:
    """Each module's source as token ids of the model's own tokenizer."""
    tok = load_tokenizer(model_dir)
    return [tok.encode(module_source(m), add_special_tokens=False).ids for m in modules]


def held_out_windows(model_dir: Path, length: int = 64, per_module: int = 4) -> list[list[int]]:
    """Consecutive `length`-token windows from the start of each held-out module."""
    windows = []
    for ids in corpus_ids(model_dir, HELD_OUT_MODULES):
        windows += [ids[i:i + length] for i in range(0, min(len(ids) - length, per_module * length), length)]
    return windows


def write_trained_model(directory: Path, preset: str = "tiny", steps: int = 200, seq_len: int = 128,
                        batch: int = 16, lr: float = 4e-3, seed: int = 0) -> Path:
    from transformers import DeepseekV3ForCausalLM

    directory = Path(directory)
    start = write_random_model(directory.with_name(directory.name + "-init"), preset_config(preset), seed=seed)
    dense = dequantize_checkpoint(start, directory.with_name(directory.name + "-init-f32"), torch.float32)
    ids = torch.tensor([t for module in corpus_ids(start, TRAIN_MODULES) for t in module])  # [N]

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM.from_pretrained(dense, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:  # 20 warm-up steps, then linear decay to a tenth
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([ids[i:i + seq_len] for i in starts.tolist()])  # [B, T]
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    cfg = ModelConfig.from_file(start)
    state = model.state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    cfg.write(directory)
    write_checkpoint(directory, (pair for spec in model_specs(cfg)
                                 for pair in checkpoint_tensors(spec, _trained_value(state, spec, cfg), True)))
    for name in SIDE_FILES:
        shutil.copy(start / name, directory / name)
    return directory


def _trained_value(state: dict[str, torch.Tensor], spec: TensorSpec, cfg: ModelConfig) -> torch.Tensor:
    """The trained tensor for a checkpoint entry; transformers 5 keeps a layer's experts fused as
    `experts.gate_up_proj` [E, 2I, H] (gate rows first) and `experts.down_proj` [E, H, I]."""
    name = stored_name(spec)
    if name in state or spec.expert is None:
        return state[name].detach()
    fused = f"model.layers.{spec.layer}.mlp.experts."
    inter = cfg.moe_intermediate_size
    if spec.name.endswith("gate_proj"):
        return state[fused + "gate_up_proj"][spec.expert, :inter].detach()
    if spec.name.endswith("up_proj"):
        return state[fused + "gate_up_proj"][spec.expert, inter:].detach()
    return state[fused + "down_proj"][spec.expert].detach()
