"""Fuzz, short version (scripts/fuzz.py runs the long one): malformed and hostile calls, structured
(hypothesis) and raw bytes, against a real gateway and a real pool. Every call is answered with a status that
says the request is wrong (or, for the rare valid one, served); none crashes or hangs a service, both are
SERVING afterwards and a valid request still gets the in-process engine's exact output."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.gateway_client import GatewayClient
from services.format.config import ModelConfig
from services.gateway.sampling import SamplingParams
from tests.fuzz_calls import ACCEPTABLE, fuzz_gateway, fuzz_pool
from tests.inprocess_deployment import InProcessDeployment

EXAMPLES = 300  # per target; scripts/fuzz.py runs 2,500


@pytest.fixture(scope="module")
def deployment(tiny_fp8):
    dep = InProcessDeployment(tiny_fp8, dispatch_dtype="fp32")
    yield dep
    dep.close()


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    return status == health_pb2.HealthCheckResponse.SERVING


def test_pool_survives_malformed_forward_calls(deployment, tiny_fp8):
    cfg = ModelConfig.from_file(tiny_fp8)
    codes = fuzz_pool(
        deployment.pool_addresses[0], EXAMPLES, cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts
    )
    assert sum(codes.values()) >= 4 * EXAMPLES  # unary and raw calls, then as many messages on one stream
    assert set(codes) <= ACCEPTABLE, dict(codes)
    assert codes[grpc.StatusCode.INVALID_ARGUMENT] > EXAMPLES
    assert _serving(deployment.pool_addresses[0])


def test_gateway_survives_malformed_calls_and_still_answers_exactly(deployment, engine_tiny):
    codes = fuzz_gateway(deployment.gateway, EXAMPLES)
    assert sum(codes.values()) >= 3 * EXAMPLES
    assert set(codes) <= ACCEPTABLE, dict(codes)
    assert _serving(deployment.gateway)
    assert deployment.runtime.core.scheduler.idle  # nothing left running or waiting
    cache = deployment.runtime.core.cache
    assert cache.free_blocks == cache.num_blocks  # every block given back
    prompt = [5, 17, 300, 42]
    got = GatewayClient(deployment.gateway).generate(None, prompt, max_tokens=8, ignore_eos=True)
    want = engine_tiny.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    assert got["token_ids"] == want
