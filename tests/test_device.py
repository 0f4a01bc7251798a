"""`--device cpu|cuda|auto`: resolved in one place (services/math/device.py); asking for cuda where there is none
is one line naming the flag, exit 2 for the CLI (generate, score, up), a startup error for the services. The
subprocess checks run only where torch sees no GPU; the in-process ones make torch see none."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from services.cli.app import app
from services.gateway.config import GatewayConfig
from services.math.device import DeviceUnavailableError, experts_on, on_host, resolve_device, serving_dtype
from tests.test_cli_errors import assert_one_line_error, run_cli

no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
NO_CUDA = "--device cuda: CUDA is not available here"


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolution(no_cuda):
    assert resolve_device("auto") == resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DeviceUnavailableError, match=f"^{NO_CUDA} .*; use --device cpu or auto$"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailableError, match="--gpu cuda:1: CUDA is not available"):
        resolve_device("cuda:1", flag="--gpu")
    with pytest.raises(DeviceUnavailableError, match="--device must be one of auto, cpu, cuda, got 'tpu'"):
        resolve_device("tpu")
    assert serving_dtype(torch.device("cpu")) == torch.float32 and serving_dtype(torch.device("cuda")) == torch.bfloat16


def test_auto_is_cuda_where_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_host_adapters_hand_host_tensors_over():
    seen = []

    class Backend:
        placement = "p"

        def start(self, layer, hidden, idx, w):
            seen.append((hidden.device.type, idx.device.type, w.device.type))
            return lambda: hidden.float() * 2

    cpu = torch.device("cpu")
    backend = Backend()
    assert experts_on(backend, cpu) is backend
    wrapped = experts_on(backend, torch.device("meta"))  # any device but the host: no GPU needed
    assert wrapped.placement == "p"
    hidden = torch.ones(2, 3, dtype=torch.bfloat16)
    out = wrapped.start(1, hidden, torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1))()
    assert out.device.type == "meta" and out.dtype == torch.bfloat16 and seen == [("cpu", "cpu", "cpu")]
    seen.clear()
    on_host(lambda layer, idx: seen.append((layer, idx.device.type)))(3, torch.zeros(2, dtype=torch.int64))
    assert seen == [(3, "cpu")]


def test_gateway_config_takes_a_device():
    assert GatewayConfig().device == "auto"
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, got 'gpu'"):
        GatewayConfig(device="gpu")


def test_gateway_runtime_refuses_a_missing_gpu_before_binding(tiny_fp8, no_cuda):
    from services.format.config import ModelConfig
    from services.gateway.runtime import GatewayRuntime
    from services.state.placement import Placement, Pool

    placement = Placement.spread(ModelConfig.from_file(tiny_fp8), [Pool("pool-0", "127.0.0.1:1")])
    config = GatewayConfig(model=tiny_fp8, grpc_port=0, http_port=-1, device="cuda")
    with pytest.raises(DeviceUnavailableError, match=NO_CUDA):
        asyncio.run(GatewayRuntime.start(config, placement))


def test_pool_refuses_a_missing_gpu(tiny_fp8, no_cuda):
    from services.expert.server import pool_argv, start_pool

    with pytest.raises(DeviceUnavailableError, match=NO_CUDA):
        asyncio.run(start_pool(tiny_fp8, "pool-0", [], device="cuda"))
    assert pool_argv("m", "p", "redis://x", 1)[-2:] != ["--device", "auto"]
    assert pool_argv("m", "p", "redis://x", 1, device="cuda")[-2:] == ["--device", "cuda"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["score", "--tokens", "1,2", "--device", "cuda"], NO_CUDA),
        (["score", "--tokens", "1,2", "--device", "tpu"], "--device must be one of auto, cpu, cuda, got 'tpu'"),
        (["generate", "--target", "127.0.0.1:1", "--tokens", "1,2", "--device", "cpu"], "--device applies to --model"),
    ],
)
def test_model_verbs_refuse_in_one_line(tiny_fp8, no_cuda, args, message):
    if "--target" not in args:
        args = [*args, "--model", str(tiny_fp8)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()] and message in result.stderr, result.stderr
    assert result.stderr.startswith("expertmesh: error: ")


@no_gpu_here
def test_generate_and_up_with_cuda_exit_2_on_this_machine(tiny_fp8, tmp_path):
    """The real console script, as a user runs it."""
    assert_one_line_error(
        run_cli(["generate", "--model", str(tiny_fp8), "--tokens", "1,2", "--device", "cuda"], tmp_path), NO_CUDA
    )
    up = run_cli(
        ["up", "--model", str(tiny_fp8), "--device", "cuda", "--grpc-port", "0", "--http-port", "-1"], tmp_path
    )
    assert_one_line_error(up, NO_CUDA)
    assert not (tmp_path / "up.json").exists()


@no_gpu_here
def test_pool_process_with_cuda_is_a_startup_error(tiny_fp8):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.expert.server",
            "--model",
            str(tiny_fp8),
            "--pool-id",
            "p",
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"expertmesh pool: {NO_CUDA}"), proc.stderr
