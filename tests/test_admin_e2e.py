"""The admin CLI against a running deployment (`expertmesh up`: real Redis, pools and gateway processes):
placement show/export/apply/replicate/move/pin/unpin, pools list/drain, rebalance, with generation checked
against the in-process engine after every change."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from services.cli.app import app
from services.cli.gateway_client import GatewayClient
from services.cli.placement_commands import SHARES_MIN_GAIN
from services.format.config import ModelConfig
from services.gateway.sampling import SamplingParams
from tests.local_deployment import UpProcess
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]
runner = CliRunner()
PROMPT = [7, 100, 33, 512, 9, 64]


@pytest.fixture(scope="module")
def deployment(tiny_fp8, tmp_path_factory):
    up = UpProcess(tiny_fp8, pools=3, dispatch="fp32", home=tmp_path_factory.mktemp("admin"))
    yield up
    up.stop()


def cli(deployment, *args, code=0):
    result = runner.invoke(app, [*args, "--redis", deployment.redis])
    assert result.exit_code == code, result.output
    return result


def cli_json(deployment, *args):
    return json.loads(cli(deployment, *args, "--json").stdout)


def still_correct(deployment, engine):
    deployment.wait_rolled_out()  # the gateway follows the stored version
    client = GatewayClient(deployment.gateway)
    got = client.generate(None, PROMPT, 8, ignore_eos=True)["token_ids"]
    client.close()
    assert got == engine.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids


def test_show_and_pools_list(deployment):
    shown = cli_json(deployment, "placement", "show", "--layer", "1")
    assert shown["version"] == 1 and list(shown["layers"]) == ["1"] and len(shown["pools"]) == 3
    assert all(p["slots"] == 8 for p in shown["pools"])  # ceil(16/3) = 6, plus 25%, rounded up
    listed = cli_json(deployment, "pools", "list")
    assert [p["health"] for p in listed["pools"]] == ["SERVING"] * 3


def test_replicate_move_pin_and_their_errors(deployment, engine_tiny):
    shown = cli_json(deployment, "placement", "show")
    holder = shown["layers"]["1"][0][0]
    other = next(p["pool_id"] for p in shown["pools"] if p["pool_id"] != holder)
    third = next(p["pool_id"] for p in shown["pools"] if p["pool_id"] not in (holder, other))
    out = cli_json(deployment, "placement", "replicate", "--layer", "1", "--expert", "0", "--pool", other)
    assert out["loads"] == 1 and out["version"] == shown["version"] + 1
    still_correct(deployment, engine_tiny)
    cli(deployment, "placement", "pin", "--layer", "1", "--expert", "0", "--pool", other)
    refused = cli(
        deployment, "placement", "move", "--layer", "1", "--expert", "0", "--from", other, "--to", third, code=2
    )
    assert "pinned" in refused.output
    cli(deployment, "placement", "unpin", "--layer", "1", "--expert", "0", "--pool", other)
    moved = cli_json(deployment, "placement", "move", "--layer", "1", "--expert", "0", "--from", other, "--to", third)
    assert moved["loads"] == 1 and moved["unloads"] == 1
    still_correct(deployment, engine_tiny)
    assert (
        "unknown pool"
        in cli(
            deployment, "placement", "replicate", "--layer", "1", "--expert", "0", "--pool", "pool-99", code=2
        ).output
    )
    assert "not an MoE layer" in cli(deployment, "placement", "show", "--layer", "0", code=2).output


def test_export_edit_apply(deployment, engine_tiny, tmp_path):
    path = tmp_path / "placement.json"
    cli(deployment, "placement", "export", str(path))
    data = json.loads(path.read_text())
    data["layers"]["2"][5] = []  # an expert without replica is refused
    path.write_text(json.dumps(data))
    assert "has no replica" in cli(deployment, "placement", "apply", str(path), code=2).output
    data["layers"]["2"][5] = ["pool-0", "pool-1", "pool-2"]
    path.write_text(json.dumps(data))
    dry = cli_json(deployment, "placement", "apply", str(path), "--dry-run")
    assert dry["dry_run"] and "version" not in dry
    applied = cli_json(deployment, "placement", "apply", str(path))
    assert applied["version"] == dry["from_version"] + 1
    still_correct(deployment, engine_tiny)
    assert "no placement file" in cli(deployment, "placement", "apply", str(tmp_path / "nope.json"), code=2).output


def test_apply_and_show_shares(deployment, engine_tiny, tmp_path):
    path = tmp_path / "placement.json"
    cli(deployment, "placement", "export", str(path))
    data = json.loads(path.read_text())
    data["layers"]["3"][2] = ["pool-0", "pool-1"]
    data["shares"] = {"3": {"2": [0.5, 0.6]}}
    path.write_text(json.dumps(data))
    refused = cli(deployment, "placement", "apply", str(path), code=2)
    assert "layer 3 expert 2: shares sum to 1.1, not 1" in refused.output
    data["shares"] = {"3": {"2": [0.25, 0.75]}}
    path.write_text(json.dumps(data))
    cli_json(deployment, "placement", "apply", str(path))
    still_correct(deployment, engine_tiny)
    assert cli_json(deployment, "placement", "show", "--layer", "3")["shares"] == {"3": {"2": [0.25, 0.75]}}
    assert "expert    2: pool-0, pool-1  (shares: 0.250, 0.750)" in cli(deployment, "placement", "show").output


def test_rebalance_after_load(deployment, engine_tiny, tiny_fp8):
    before = deployment.settled_routed_pairs(layer=1)
    client = GatewayClient(deployment.gateway)
    for i in range(4):
        client.generate(None, [5 + i] * 20, 10, ignore_eos=True)
    client.close()
    # 20 prompt tokens + 9 fed back, each routed to num_experts_per_tok experts: all of it counted before planning
    expected = 4 * (20 + 9) * ModelConfig.from_file(tiny_fp8).num_experts_per_tok
    wait_until(lambda: deployment.routed_pairs(layer=1) - before >= expected, 30, "the load counts in Redis")
    report = cli_json(deployment, "load", "top", "--window", "600")
    assert sum(p["tokens"] for p in report["pools"]) > 0
    dry = cli_json(deployment, "rebalance", "--dry-run", "--window", "600")
    assert dry["balancedness_after"] >= dry["balancedness_before"] - 1e-9
    done = cli_json(deployment, "rebalance", "--window", "600")
    gain = dry["balancedness_after"] - dry["balancedness_before"]
    if dry["moves"] or gain > SHARES_MIN_GAIN:  # the same load, the same plan: what the dry run proposed rolls out
        assert done["loads"] == dry["moves"] and done["version"] == done["from_version"] + 1
    else:
        assert done["moves"] == 0 and "version" not in done
    still_correct(deployment, engine_tiny)


def test_drain_takes_a_pool_out(deployment, engine_tiny):
    out = cli_json(deployment, "pools", "drain", "pool-2")
    assert out["version"] > 1
    shown = cli_json(deployment, "placement", "show")
    assert "pool-2" not in {p["pool_id"] for p in shown["pools"]}
    assert all("pool-2" not in r for layer in shown["layers"].values() for r in layer)
    still_correct(deployment, engine_tiny)
    assert "unknown pool" in cli(deployment, "pools", "drain", "pool-2", code=2).output
