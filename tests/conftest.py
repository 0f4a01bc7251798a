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
    return write_random_model(
        tmp_path_factory.mktemp("tiny-fp8"), preset_config("tiny"), seed=0, shard_bytes=256 * 1024
    )


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
        import subprocess

        import redis

        from services.rpc.processes import free_port  # not a kernel-assigned port: see its docstring
        from tests.waiting import wait_until

        self.port = port if port is not None else free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server"),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} (port {self.port} taken?)")
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        try:
            wait_until(answers, 30, f"redis-server to answer on port {self.port}", interval_s=0.02)
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
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
