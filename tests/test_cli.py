"""The expertmesh CLI: init-model, score and generate, their JSON shapes and their errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from services.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "tiny"
    result = runner.invoke(app, ["init-model", str(d), "--preset", "tiny", "--seed", "5"])
    assert result.exit_code == 0, result.output
    return d


def test_init_model_refuses_to_overwrite(model_dir):
    result = runner.invoke(app, ["init-model", str(model_dir)])
    assert result.exit_code == 2 and "exists" in result.output


def test_init_model_unknown_preset(tmp_path):
    result = runner.invoke(app, ["init-model", str(tmp_path / "x"), "--preset", "huge"])
    assert result.exit_code == 2 and "unknown preset 'huge'" in result.output


def test_no_fp8_writes_bf16(tmp_path):
    result = runner.invoke(app, ["init-model", str(tmp_path / "m"), "--no-fp8"])
    assert result.exit_code == 0
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())


def test_score_json_shape(model_dir):
    result = runner.invoke(
        app, ["score", "--model", str(model_dir), "--tokens", "5,17,300,2", "--top-k", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["token_ids"] == [5, 17, 300, 2]
    first, *rest = out["positions"]
    assert first == {"token_id": 5, "logprob": None, "top": []}
    for pos, tok in zip(rest, [17, 300, 2]):
        assert pos["token_id"] == tok and pos["logprob"] < 0 and len(pos["top"]) == 3
        assert (
            pos["top"][0]["logprob"] >= pos["top"][1]["logprob"] >= pos["logprob"] or pos["top"][0]["token_id"] == tok
        )


def test_generate_json_greedy_is_deterministic(model_dir):
    args = ["generate", "--model", str(model_dir), "Hello world", "--max-tokens", "6", "--json"]
    a, b = runner.invoke(app, args), runner.invoke(app, args)
    assert a.exit_code == 0, a.output
    out = json.loads(a.stdout)
    assert set(out) == {"prompt_token_ids", "token_ids", "text", "finish_reason"}
    assert out["prompt_token_ids"][0] == 0  # BOS
    assert out["finish_reason"] in ("length", "stop")
    assert 1 <= len(out["token_ids"]) <= 6 and isinstance(out["text"], str)
    assert json.loads(b.stdout) == out


def test_generate_from_tokens_matches_score_top1(model_dir):
    gen = json.loads(
        runner.invoke(
            app, ["generate", "--model", str(model_dir), "--tokens", "5,17,300", "--max-tokens", "1", "--json"]
        ).stdout
    )
    sc = json.loads(
        runner.invoke(
            app,
            [
                "score",
                "--model",
                str(model_dir),
                "--tokens",
                ",".join(map(str, [5, 17, 300, gen["token_ids"][0]])),
                "--top-k",
                "1",
                "--json",
            ],
        ).stdout
    )
    assert sc["positions"][-1]["top"][0]["token_id"] == gen["token_ids"][0]


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--model", "{m}", "--tokens", "5,99999"], "outside the vocabulary"),
        (["generate", "--model", "{m}", ""], "empty"),
        (["generate", "--model", "/nonexistent/model", "--tokens", "5"], "no model directory"),
        (["score", "--model", "{m}", "--tokens", "a,b"], "comma-separated integers"),
        (["score", "--model", "{m}"], "exactly one of"),
        (["generate", "--model", "{m}", "--tokens", "5", "--max-tokens", "0"], "max_tokens"),
    ],
)
def test_bad_arguments_one_line_error(model_dir, args, message):
    result = runner.invoke(app, [a.replace("{m}", str(model_dir)) for a in args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow  # the CLI as a process of its own
def test_console_script_error_has_no_traceback(model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.app", "generate", "--model", str(model_dir), "--tokens", "5,99999"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "expertmesh: error: token id 99999 is outside the vocabulary [0, 1024)"
    assert proc.stdout == ""


def test_generate_prints_the_text_as_it_is_made(model_dir):
    """Without --json the text goes to stdout piece by piece (the engine's on_text); it is the --json text."""
    args = ["generate", "--model", str(model_dir), "Hello world", "--max-tokens", "12"]
    as_json = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0, plain.output
    expected = as_json["text"] or " ".join(map(str, as_json["token_ids"]))
    assert plain.stdout == expected + "\n"
