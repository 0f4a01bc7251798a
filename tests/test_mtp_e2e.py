"""MTP through `expertmesh up --mtp --num-speculative-tokens 2` (real processes, real Redis, fp32 dispatch): greedy
output identical to the in-process engine without MTP, the gateway's draft counters, and the MTP layer's routed
tokens recorded in Redis like every MoE layer's (its experts are on the pools: the placement covers it)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from services.cli.gateway_client import GatewayClient
from services.format.presets import preset_config
from services.gateway.sampling import SamplingParams
from tests.local_deployment import UpProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not any(
            os.access(os.path.join(p, "redis-server"), os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep)
        ),
        reason="redis-server is not installed (scripts/bootstrap.sh installs it)",
    ),
]

PROMPT_LENGTHS = [3, 7, 12, 20, 33, 5]
# 6 requests at once: above the default --mtp-max-batch (4), so the limit is raised for them to draft
MTP_FLAGS = ["--mtp", "--num-speculative-tokens", "2", "--mtp-max-batch", "8"]


def test_up_with_mtp_greedy_equals_in_process_without(tiny_fp8, tmp_path_factory, engine_tiny):
    g = torch.Generator().manual_seed(23)
    prompts = [torch.randint(2, 1024, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    home = tmp_path_factory.mktemp("up-mtp")
    up = UpProcess(tiny_fp8, pools=2, dispatch="fp32", home=home, extra=MTP_FLAGS)
    try:
        client = GatewayClient(up.gateway, timeout_s=180)
        try:
            with ThreadPoolExecutor(len(prompts)) as pool:  # all in flight at once: continuous batching
                remote = list(pool.map(lambda p: client.generate(None, p, 40, ignore_eos=True), prompts))
        finally:
            client.close()
        local = engine_tiny.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))
        assert [r["token_ids"] for r in remote] == [g.token_ids for g in local]
        drafted = up.metric("gateway", "moe_spec_decode_draft_tokens_total")
        accepted = up.metric("gateway", "moe_spec_decode_accepted_tokens_total")
        assert drafted >= len(prompts) * 19 and 0 <= accepted <= drafted  # at least one draft every other token
        mtp_layer = preset_config("tiny").num_hidden_layers
        assert up.settled_routed_pairs(layer=mtp_layer) > 0
    finally:
        up.stop()
