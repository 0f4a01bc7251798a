"""Shared fixtures: models made by the project itself (init-model's writer), and the Hugging Face oracle."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run under the interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from services.format.convert import dequantize_checkpoint  # noqa: E402
from services.format.model_writer import write_random_model  # noqa: E402
from services.format.presets import preset_config  # noqa: E402

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
def tiny_trained_fp8(tmp_path_factory):
    """The tiny preset trained for 200 steps on Python source (about a minute): a model with learned margins."""
    from tests.trained_model import write_trained_model

    return write_trained_model(tmp_path_factory.mktemp("tiny-trained") / "model")


@pytest.fixture(scope="session")
def engine_tiny(tiny_fp8):
    from services.gateway.engine import Engine

    return Engine.from_dir(tiny_fp8, cache_tokens=4096, block_size=16)


def load_hf(directory):
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


class RedisServer:
    """A real redis-server on a free port of 127.0.0.1 (installed by scripts/bootstrap.sh)."""

    def __init__(self, port: int | None = None):
        import shutil
        import socket
        import subprocess
        import time

        import redis

        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def redis_server():
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/bootstrap.sh installs it)")
    server = RedisServer()
    yield server
    server.stop()
