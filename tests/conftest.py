"""Shared fixtures: models made by the project itself (init-model's writer), and the Hugging Face oracle."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run under the interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from services.common.convert import dequantize_checkpoint  # noqa: E402
from services.common.model_writer import write_random_model  # noqa: E402
from services.common.presets import preset_config  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory):
    """The tiny preset, FP8, sharded small so that single tensors live in different files."""
    return write_random_model(tmp_path_factory.mktemp("tiny-fp8"), preset_config("tiny"), seed=0, shard_bytes=256 * 1024)


@pytest.fixture(scope="session")
def tiny_fp8_dense(tiny_fp8, tmp_path_factory):
    """The same model dequantized to float32, in transformers 5.x's config spelling: what the oracle loads."""
    return dequantize_checkpoint(tiny_fp8, tmp_path_factory.mktemp("tiny-fp8-f32"), torch.float32)


@pytest.fixture(scope="session")
def engine_tiny(tiny_fp8):
    from services.gateway.engine import Engine

    return Engine.from_dir(tiny_fp8, cache_tokens=4096, block_size=16)


def load_hf(directory):
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
