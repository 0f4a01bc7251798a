"""The README's main job (scripts/main_job.sh, run by scripts/bootstrap.sh): the demo preset trains and says what
it is; the script serves the demo model with `expertmesh up`, answers one completion over the HTTP API, shows
`load top`, and stops everything, also when it fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli.app import app
from services.format.tokenizer import load_tokenizer
from services.gateway.engine import Engine
from services.gateway.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "main_job.sh"
redis_missing = shutil.which("redis-server") is None


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    """`init-model --preset demo` with 4 training steps instead of the demo's ~minute (the same code path)."""
    import services.training.demo as demo

    directory = tmp_path_factory.mktemp("demo") / "models" / "demo"
    steps, demo.DEMO_STEPS = demo.DEMO_STEPS, 4
    try:
        result = CliRunner().invoke(app, ["init-model", str(directory), "--preset", "demo", "--seed", "1"])
    finally:
        demo.DEMO_STEPS = steps
    assert result.exit_code == 0, result.output
    return directory, result.output


def test_demo_preset_trains_and_says_what_it_is(short_demo):
    directory, output = short_demo
    assert "trained 4 steps on the Python standard library's source; it completes Python-like text" in output
    assert re.search(
        r"loss \d+\.\d\d at the first step, \d+\.\d\d over the last 10, \d+\.\d\d on modules held out", output
    )
    cfg = json.loads((directory / "config.json").read_text())
    assert cfg["hidden_size"] == 320 and "quantization_config" in cfg  # the tiny architecture, FP8 as DeepSeek ships
    tok = load_tokenizer(directory)  # learned from the Python source: indentation in one token
    assert tok.get_vocab_size() == 1024 and len(tok.encode("\n        return self", add_special_tokens=False).ids) == 3


def test_demo_model_is_served(short_demo):
    directory, _ = short_demo
    engine = Engine.from_dir(directory, cache_tokens=1024, block_size=16)
    out = engine.generate([engine.encode("def fibonacci(n):")], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8


def test_main_job_is_wired_into_bootstrap():
    text = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert 'if [ -z "${SKIP_MAIN_JOB:-}" ]; then\n  bash scripts/main_job.sh' in text
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _run_main_job(cache: Path, timeout_s: float, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dict(os.environ, MAIN_JOB_CACHE=str(cache), **env),
    )


def _processes_reading(path: Path) -> list[str]:
    """Command lines of live processes that name `path` (up, its pools and gateway name the model directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmd and proc.name.isdigit() and int(proc.name) != os.getpid():
            found.append(cmd)
    return found


@pytest.mark.slow
@pytest.mark.skipif(redis_missing, reason="redis-server is not installed (scripts/bootstrap.sh installs it)")
def test_main_job_end_to_end(short_demo):
    """The whole script on a cached (briefly trained) demo model: about 25 s on 2 cores."""
    directory, _ = short_demo
    cache = directory.parents[1]
    run = _run_main_job(cache, 240, MAIN_JOB_MAX_TOKENS="12")
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "cached in" in out and "it completes Python-like text, nothing more" in out
    assert re.search(r"^http\s+http://127\.0\.0\.1:\d+/v1$", out, re.M) and "ready" in out
    request = json.loads(out[out.index("{", out.index("POST ")) : out.index("reply:")])
    assert request == {"model": "demo", "prompt": "def fibonacci(n):", "max_tokens": 12, "temperature": 0}
    reply = json.loads(out[out.index("reply:") + len("reply:") : out.index("prompt and completion:")])
    assert reply["usage"]["completion_tokens"] == 12 and reply["choices"][0]["finish_reason"] == "length"
    assert re.search(r"balancedness [\d.]+, placement version 1", out)
    assert re.search(r"^\s+pool-0\s+[1-9]\d* tokens$", out, re.M)  # the request's routed tokens were counted
    assert "stopped" in out and "main job done" in out
    assert not (cache / "expertmesh" / "up.json").exists()  # up stopped cleanly, from the script's own home
    assert not _processes_reading(directory)


@pytest.mark.slow
@pytest.mark.skipif(redis_missing, reason="redis-server is not installed (scripts/bootstrap.sh installs it)")
def test_main_job_stops_up_when_it_fails(short_demo, tmp_path):
    """A step that fails (here: `up` not ready within MAIN_JOB_READY_TIMEOUT_S) stops `up` and all it started."""
    directory, _ = short_demo
    cache = tmp_path / "cache"
    shutil.copytree(directory, cache / "models" / "demo")
    run = _run_main_job(cache, 240, MAIN_JOB_READY_TIMEOUT_S="1")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "was not ready after 1 s" in run.stderr
    assert re.search(r"stopping expertmesh up \(pid \d+\)", run.stdout)
    assert not _processes_reading(cache / "models" / "demo")
    assert not (cache / "expertmesh" / "up.json").exists()
