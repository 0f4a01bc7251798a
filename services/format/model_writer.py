"""Writing checkpoints in the real Hugging Face DeepSeek-V3 layout: config.json, sharded safetensors with
`model.safetensors.index.json`, tokenizer files, generation_config.json.

`write_random_model` makes the test and benchmark models (`expertmesh init-model`); `write_checkpoint` writes
any tensor stream (also used to write a dequantized copy for the Hugging Face oracle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.format.checkpoint import INDEX_FILE
from services.format.config import ModelConfig
from services.format.tensor_names import MTP_COPIES, Kind, TensorSpec, model_specs, mtp_copy_source, stored_name
from services.format.tokenizer import write_tokenizer
from services.format.weights import LinearWeight

DEFAULT_SHARD_BYTES = 32 * 1024 * 1024
ProgressFn = Callable[[int, int], None]


def _umask() -> int:
    """The process's umask, read from /proc where it can be (os.umask alone can only read it by changing it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with the permissions of any other file written here: it writes through a
    private temporary file (mode 0600) and renames it into place, so the shard would stay 0600."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


def write_checkpoint(
    directory: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[str]:
    """Write named tensors into shards of at most ~`shard_bytes` each, plus the index. Returns the shard names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + size > shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor.contiguous()
        sizes[-1] += size
    n = len(shards)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for file, shard in zip(files, shards):
        save_shard(shard, directory / file)
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files


def random_tensors(
    cfg: ModelConfig, seed: int, fp8: bool, progress: ProgressFn | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights with O(1) activations (so logits are spread and routing is decisive), in checkpoint dtypes:
    FP8 projections with fp32 block scales (or BF16 without FP8), BF16 norms/embeddings/router, FP32 bias; the
    MTP layer's embedding and head are copies of the main model's, as DeepSeek-V3 stores them."""
    gen = torch.Generator().manual_seed(seed)
    specs = model_specs(cfg)
    residual_scale = (2 * cfg.num_hidden_layers) ** -0.5
    copied = set(MTP_COPIES.values()) if cfg.num_nextn_predict_layers else set()
    kept: dict[str, torch.Tensor] = {}  # the main embedding and head, which the MTP layer stores copies of
    for i, spec in enumerate(specs):
        source = mtp_copy_source(spec)
        value = kept[source] if source is not None else _random_value(spec, gen, residual_scale)
        if spec.name in copied:
            kept[spec.name] = value
        yield from checkpoint_tensors(spec, value, fp8)
        if progress:
            progress(i + 1, len(specs))


def checkpoint_tensors(spec: TensorSpec, value: torch.Tensor, fp8: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor's stored form: projections as FP8 blocks plus `_scale_inv` (BF16 without FP8), norms,
    embeddings and the router in BF16, the routing bias in FP32, as DeepSeek's checkpoints store them."""
    name = stored_name(spec)
    if tuple(value.shape) != spec.shape:
        raise ValueError(f"{name}: expected shape {list(spec.shape)}, got {list(value.shape)}")
    if spec.kind is Kind.LINEAR and fp8:
        lw = LinearWeight.quantized(value.float())
        yield name, lw.weight
        yield f"{name}_scale_inv", lw.scale_inv
    elif spec.kind is Kind.BIAS:
        yield name, value.float()
    else:
        yield name, value.to(torch.bfloat16)


def _random_value(spec: TensorSpec, gen: torch.Generator, residual_scale: float) -> torch.Tensor:
    if spec.kind in (Kind.LINEAR, Kind.PROJ):
        value = torch.randn(spec.shape, generator=gen) * spec.shape[1] ** -0.5
        if spec.name.endswith(("down_proj", "o_proj")):
            # projections back into the residual stream get GPT-2's 1/sqrt(2 * layers): each layer nudges the
            # stream rather than replacing it, as in trained models
            value = value * residual_scale
    elif spec.kind is Kind.NORM:
        value = 1.0 + 0.1 * torch.randn(spec.shape, generator=gen)
    elif spec.kind is Kind.EMBED and spec.name == "lm_head":
        # logits with a standard deviation of about 3: peaked enough for decisive greedy choices, not one-hot
        value = torch.randn(spec.shape, generator=gen) * 3 * spec.shape[1] ** -0.5
    elif spec.kind is Kind.EMBED:
        value = torch.randn(spec.shape, generator=gen)
    elif spec.kind is Kind.ROUTER:
        value = torch.randn(spec.shape, generator=gen) * spec.shape[1] ** -0.5
    elif spec.kind is Kind.BIAS:
        # both signs, comparable to the spread of sigmoid scores: group masking and selection both matter
        value = (torch.rand(spec.shape, generator=gen) - 0.5) * 0.4
    else:  # pragma: no cover
        raise AssertionError(spec.kind)
    return value


def write_random_model(
    directory: str | Path,
    cfg: ModelConfig,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: ProgressFn | None = None,
    spelling: str = "deepseek",
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg.write(directory, spelling)
    write_checkpoint(directory, random_tensors(cfg, seed, cfg.quantization is not None, progress), shard_bytes)
    write_tokenizer(directory, cfg.vocab_size, cfg.max_position_embeddings)
    (directory / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": cfg.bos_token_id,
                "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0],
                "do_sample": True,
                "temperature": 0.6,
                "top_p": 0.95,
            },
            indent=2,
        )
        + "\n"
    )
    return directory
