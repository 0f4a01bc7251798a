"""MTP beyond the engine: `generate --mtp --json`, GatewayConfig's fields, the gateway's two counters, and a gateway
with remote expert pools (real gRPC servers in this process, fp32 dispatch): greedy output identical to the
in-process engine without MTP, and a verify step that sends each pool at most one call per MoE layer, as a plain
decode step does."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from services.cli.app import app
from services.cli.gateway_client import GatewayClient
from services.gateway.config import GatewayConfig
from services.gateway.engine import Engine
from services.gateway.runtime import ServingLoop
from services.gateway.sampling import SamplingParams
from services.rpc.metrics import GatewayMetrics
from services.settings import to_argv
from tests.inprocess_deployment import InProcessDeployment

PROMPT_LENGTHS = [3, 12, 25, 7]


def _prompts():
    g = torch.Generator().manual_seed(17)
    return [torch.randint(2, 1024, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def test_generate_json_reports_the_drafts(tiny_fp8):
    def run(*extra):
        result = CliRunner().invoke(
            app,
            [
                "generate",
                "--model",
                str(tiny_fp8),
                "--tokens",
                "5,9,300,41",
                "--max-tokens",
                "12",
                "--json",
                "--device",
                "cpu",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])

    plain, spec = run(), run("--mtp")
    assert spec["token_ids"] == plain["token_ids"] and "mtp" not in plain
    assert spec["mtp"]["draft_tokens"] > 0 and 0 <= spec["mtp"]["accepted_tokens"] <= spec["mtp"]["draft_tokens"]
    refused = CliRunner().invoke(app, ["generate", "--target", "127.0.0.1:1", "--tokens", "5", "--mtp"])
    assert refused.exit_code != 0 and "--mtp applies to --model" in refused.output


def test_gateway_config_fields():
    assert "--mtp" in to_argv(GatewayConfig(model="/m", mtp=True)) and GatewayConfig().mtp is False
    assert GatewayConfig(num_speculative_tokens=3).num_speculative_tokens == 3
    for bad in (0, -1, 9):
        with pytest.raises(ValueError, match="num_speculative_tokens"):
            GatewayConfig(num_speculative_tokens=bad)


def test_the_gateway_exports_drafted_and_accepted_tokens(tiny_fp8):
    engine = Engine.from_dir(tiny_fp8, cache_tokens=1024, block_size=16, mtp=True)
    metrics = GatewayMetrics(CollectorRegistry())
    loop = ServingLoop(engine.core, metrics)  # not started: its export is called by hand
    engine.generate(_prompts()[:2], SamplingParams(max_tokens=10, ignore_eos=True))
    loop._export()
    engine.generate(_prompts()[2:], SamplingParams(max_tokens=6, ignore_eos=True))
    loop._export()
    loop._export()  # nothing new: nothing added
    sched = engine.scheduler
    assert metrics.spec_draft_tokens._value.get() == sched.draft_tokens > 0
    assert metrics.spec_accepted_tokens._value.get() == sched.accepted_tokens


@pytest.fixture(scope="module")
def remote(tiny_fp8):
    dep = InProcessDeployment(tiny_fp8, "fp32", pools=2, mtp=True)
    yield dep
    dep.close()


def test_remote_experts_greedy_with_mtp_equals_in_process_without(remote, engine_tiny):
    core = remote.runtime.core
    assert core.runner.drafter is not None
    layers_seen: list[list[tuple[int, int]]] = []  # per step: (pool, layer) of every Forward call
    for pool, (_, servicer) in enumerate(remote.pools):
        decode = servicer._decode

        def recording(request, pool=pool, decode=decode):
            layers_seen[-1].append((pool, request.layer))
            return decode(request)

        servicer._decode = recording
    execute, drafted = core.runner.execute, []

    def counting(plan):
        layers_seen.append([])
        drafted.append(sum(len(c.draft) for c in plan.chunks))
        return execute(plan)

    core.runner.execute = counting
    try:
        prompts = _prompts()
        client = GatewayClient(remote.gateway, timeout_s=120)
        try:
            with ThreadPoolExecutor(len(prompts)) as pool:
                out = list(pool.map(lambda p: client.generate(None, p, 16, ignore_eos=True), prompts))
        finally:
            client.close()
    finally:
        core.runner.execute = execute
        for _, servicer in remote.pools:
            del servicer._decode
    local = engine_tiny.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    assert [o["token_ids"] for o in out] == [g.token_ids for g in local]
    cfg = core.cfg
    assert any(drafted) and core.scheduler.draft_tokens > 0
    for calls in layers_seen:  # one forward per step: at most one call per pool per MoE layer (the MTP layer's too)
        assert max(Counter(calls).values(), default=0) == 1
        assert {layer for _, layer in calls} <= set(cfg.moe_layers)
    verify_steps = [calls for calls, n in zip(layers_seen, drafted) if n]
    assert any(layer == cfg.num_hidden_layers for calls in verify_steps for _, layer in calls)
