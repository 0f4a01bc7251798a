"""One name and one default per setting: the gateway's and the autoscaler's flags, `expertmesh up`'s options and
the Helm chart's values all derive from GatewayConfig and AutoscalerConfig."""

from __future__ import annotations

import dataclasses

import pytest
import typer.main
import yaml

from services.autoscaler.config import AutoscalerConfig
from services.autoscaler.service import build_parser as autoscaler_parser
from services.cli.up import up
from services.gateway.config import GatewayConfig
from services.gateway.main import build_parser as gateway_parser
from services.settings import chart_key, flag_name, to_argv
from tests.test_helm_chart import CHART, render

DEPLOYMENT_CHOICES = {"host", "grpc_port", "metrics_port"}  # where a process listens: the chart picks its own


def _args(docs, kind, suffix):
    doc = next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix))
    return doc["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.fixture(scope="module")
def chart():
    result = render()
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return docs, yaml.safe_load((CHART / "values.yaml").read_text())


def _flags(parser):
    return {opt for action in parser._actions for opt in action.option_strings}


@pytest.mark.parametrize(
    "cls,section,suffix,parser",
    [
        (GatewayConfig, "gateway", "-gateway", gateway_parser),
        (AutoscalerConfig, "autoscaler", "-autoscaler", autoscaler_parser),
    ],
)
def test_chart_values_and_args_are_the_config_fields(chart, cls, section, suffix, parser):
    docs, values = chart
    known = _flags(parser())
    args = _args(docs, "Deployment", suffix)
    for arg in args:
        assert arg.split("=")[0] in known, f"the chart passes {arg}, which the service does not know"
    matched = 0
    for f in dataclasses.fields(cls):
        key = chart_key(f.name)
        if key not in values[section] or f.name in DEPLOYMENT_CHOICES:
            continue
        matched += 1
        assert values[section][key] == f.default, (
            f"{section}.{key} defaults to {values[section][key]}, {f.name} to {f.default}"
        )
        flag = flag_name(f.name)
        passed = {flag, "--no-" + flag[2:]} if isinstance(f.default, bool) else None  # a switch, either way
        assert any(a in passed if passed else a.startswith(flag + "=") for a in args), (
            f"{section}.{key} is not passed as {flag}"
        )
    assert matched >= 3


def test_up_options_share_the_services_flag_names_and_defaults():
    app = typer.Typer(add_completion=False)
    app.command()(up)
    params = {p.opts[0]: p.default for p in typer.main.get_command(app).params if p.opts}
    for cls in (GatewayConfig, AutoscalerConfig):
        for f in dataclasses.fields(cls):
            flag = flag_name(f.name)
            if flag in params and f.name not in {"max_pools"}:  # up runs few pools on one machine
                assert params[flag] == f.default, (
                    f"up's {flag} defaults to {params[flag]}, the service's to {f.default}"
                )
    assert {"--rebalance-threshold", "--load-window-s", "--cache-tokens", "--dispatch-dtype"} <= set(params)


def test_config_round_trips_through_its_command_line():
    config = GatewayConfig(model="/m", redis="redis://x:1/0", cache_tokens=4096, micro_batches=2, dispatch_dtype="fp32")
    args = gateway_parser().parse_args(to_argv(config))
    assert GatewayConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(GatewayConfig)}
    ) == dataclasses.replace(config, model=args.model)
    assert str(args.model) == "/m"


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="cache_tokens"):
        GatewayConfig(cache_tokens=0)
    with pytest.raises(ValueError, match="dispatch_dtype"):
        GatewayConfig(dispatch_dtype="fp16")
    for stall in (0.5, float("inf"), float("nan")):  # inf would overflow the prefill budget's token count
        with pytest.raises(ValueError, match="max_decode_stall"):
            GatewayConfig(max_decode_stall=stall)


def test_gateway_pod_grace_outlasts_its_drain(chart):
    docs, values = chart
    gateway = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-gateway"))
    drain = values["gateway"]["drainTimeoutSeconds"]
    assert drain == GatewayConfig().drain_timeout_s
    assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain
