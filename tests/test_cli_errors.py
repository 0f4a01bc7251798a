"""Every bad invocation of the real `expertmesh` console script ends with exactly one line
`expertmesh: error: ...` on stderr, nothing on stdout, exit code 2, and no traceback.

The table runs the installed binary (the same `main` as `python -m services.cli.app`) as a subprocess. The
`--target` rows that need a live gateway run against one `expertmesh up` per module (slow); the rest need no
deployment."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

BINARY = Path(sys.executable).with_name("expertmesh")
COMMAND = [str(BINARY)] if BINARY.exists() else [sys.executable, "-m", "services.cli.app"]
SHARD = "model.layers.1.mlp.experts.2.up_proj.weight"  # a tensor whose shard the bad models damage


def run_cli(args: list[str], home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, EXPERTMESH_HOME=str(home))  # never the up.json of a deployment on this machine
    env.pop("EXPERTMESH_REDIS_URL", None)
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    shown = f"exit {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    assert proc.returncode == 2, shown
    assert proc.stdout == "", shown
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("expertmesh: error: "), shown
    assert expected in lines[0], shown


@pytest.fixture(scope="module")
def files(tiny_fp8, tmp_path_factory) -> dict[str, str]:
    """Paths the table refers to as {name}: the good tiny model, damaged copies of it, bad input files."""
    root = tmp_path_factory.mktemp("cli-errors")
    out = {"m": str(tiny_fp8), "home": str(root / "home"), "missing": str(root / "no-such-model")}
    (root / "home").mkdir()
    shard = json.loads((tiny_fp8 / "model.safetensors.index.json").read_text())["weight_map"][SHARD]

    def damaged(name: str, damage) -> None:
        d = root / name
        shutil.copytree(tiny_fp8, d)
        damage(d / shard)
        out[name], out[name + "_shard"] = str(d), str(d / shard)

    damaged("truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))
    damaged("random", lambda p: p.write_bytes(os.urandom(p.stat().st_size)))
    damaged("badheader", lambda p: p.write_bytes(struct.pack("<Q", 12) + b"not json at all" + b"\0" * 64))
    garbage = root / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_bytes(os.urandom(200))
    (garbage / "model.safetensors").write_bytes(os.urandom(200))
    out["garbage"] = str(garbage)
    listed = root / "configlist"
    listed.mkdir()
    (listed / "config.json").write_text("[]")
    out["configlist"] = str(listed)
    (root / "empty").mkdir()
    out["empty"] = str(root / "empty")
    badtok = root / "badtokenizer"
    shutil.copytree(tiny_fp8, badtok)
    (badtok / "tokenizer.json").write_text("not a tokenizer")
    out["badtokenizer"] = str(badtok)
    for name, content in [
        ("rand.bin", os.urandom(512)),
        ("invalid.json", b'{"version": 1, "pools": ['),
        ("list.json", b"[1, 2, 3]"),
        ("wrongshape.json", b'{"version": 1, "pools": 5, "layers": []}'),
        ("noaddress.json", b'{"version": 1, "pools": [{"pool_id": "a"}], "layers": {"1": [["a"]]}}'),
        ("badlayer.json", b'{"version": 1, "pools": [{"pool_id": "a", "address": "h:1"}], "layers": {"one": [["a"]]}}'),
        ("load1d.json", b'{"load": [1, 2, 3]}'),
        ("loadneg.json", b'{"load": [[1, -2]]}'),
        ("plain.txt", b"hello"),
    ]:
        (root / name).write_bytes(content)
        out[name.split(".")[0]] = str(root / name)
    out["dir"] = str(root)
    return out


CLOSED = "127.0.0.1:1"  # nothing listens on port 1
TOKENS = ["--tokens", "5,17"]

# (args with {placeholders} from `files`, a piece of the one error line)
OFFLINE = {
    # the model verbs, in process
    "generate-negative-token": (
        ["generate", "--model", "{m}", "--tokens", "-1,5"],
        "token id -1 is outside the vocabulary",
    ),
    "generate-token-past-uint32": (
        ["generate", "--model", "{m}", "--tokens", "5,4294967296"],
        "outside the vocabulary",
    ),
    "generate-max-tokens-huge": (
        ["generate", "--model", "{m}", *TOKENS, "--max-tokens", "5000000000"],
        "max_tokens must lie in",
    ),
    "generate-max-tokens-negative": (
        ["generate", "--model", "{m}", *TOKENS, "--max-tokens", "-5"],
        "max_tokens must be at least 1",
    ),
    "generate-temperature-nan": (
        ["generate", "--model", "{m}", *TOKENS, "--temperature", "nan"],
        "temperature must be a finite number",
    ),
    "generate-temperature-inf": (
        ["generate", "--model", "{m}", *TOKENS, "--temperature", "inf"],
        "temperature must be a finite number",
    ),
    "generate-temperature-negative": (["generate", "--model", "{m}", *TOKENS, "--temperature", "-1"], "temperature"),
    "generate-top-p-nan": (["generate", "--model", "{m}", *TOKENS, "--top-p", "nan"], "top_p must lie in (0, 1]"),
    "generate-top-p-zero": (["generate", "--model", "{m}", *TOKENS, "--top-p", "0"], "top_p must lie in (0, 1]"),
    "generate-top-p-above-one": (["generate", "--model", "{m}", *TOKENS, "--top-p", "1.5"], "top_p must lie in (0, 1]"),
    "generate-top-k-negative": (["generate", "--model", "{m}", *TOKENS, "--top-k", "-3"], "top_k"),
    "generate-seed-negative": (["generate", "--model", "{m}", *TOKENS, "--seed", "-1"], "seed must lie in"),
    "generate-seed-huge": (
        ["generate", "--model", "{m}", *TOKENS, "--seed", "99999999999999999999999"],
        "seed must lie in",
    ),
    "generate-empty-prompt": (["generate", "--model", "{m}", ""], "the prompt is empty"),
    "generate-bad-tokens": (["generate", "--model", "{m}", "--tokens", "5,x"], "comma-separated integers"),
    "generate-no-prompt": (["generate", "--model", "{m}"], "exactly one of PROMPT and --tokens"),
    "generate-no-backend": (["generate", *TOKENS], "exactly one of --model and --target"),
    "generate-two-backends": (
        ["generate", "--model", "{m}", "--target", CLOSED, *TOKENS],
        "exactly one of --model and --target",
    ),
    "score-top-k-past-vocab": (
        ["score", "--model", "{m}", *TOKENS, "--top-k", "100000"],
        "top_k must lie in [0, 1024]",
    ),
    "score-top-k-negative": (["score", "--model", "{m}", *TOKENS, "--top-k", "-1"], "--top-k"),
    "score-text-and-tokens": (
        ["score", "--model", "{m}", "--text", "hi", *TOKENS],
        "exactly one of --text and --tokens",
    ),
    # model directories
    "missing-model-dir": (["generate", "--model", "{missing}", *TOKENS], "no model directory"),
    "model-dir-is-a-file": (["score", "--model", "{plain}", *TOKENS], "no model directory"),
    "empty-model-dir": (["generate", "--model", "{empty}", *TOKENS], "config.json: no such file"),
    "garbage-model-dir": (["generate", "--model", "{garbage}", *TOKENS], "config.json: not UTF-8 text"),
    "garbage-tokenizer": (
        ["generate", "--model", "{badtokenizer}", "hello"],
        "{badtokenizer}/tokenizer.json: does not load as a Hugging Face tokenizer",
    ),
    "config-json-a-list": (["score", "--model", "{configlist}", *TOKENS], "config.json"),
    "truncated-shard": (["generate", "--model", "{truncated}", *TOKENS], "{truncated_shard}"),
    "random-bytes-shard": (["score", "--model", "{random}", *TOKENS], "{random_shard}"),
    "non-json-shard-header": (
        ["generate", "--model", "{badheader}", *TOKENS],
        "{badheader_shard}: the header is not JSON",
    ),
    # --target without a gateway
    "target-closed-port": (["generate", "--target", CLOSED, *TOKENS], f"gateway at {CLOSED} is unreachable"),
    "score-target-closed-port": (["score", "--target", CLOSED, *TOKENS], f"gateway at {CLOSED} is unreachable"),
    "target-not-host-port": (["generate", "--target", "nonsense", *TOKENS], "--target must be HOST:PORT"),
    "target-nan-timeout": (["generate", "--target", CLOSED, "--timeout-s", "nan", *TOKENS], "--timeout-s must be"),
    "target-negative-timeout": (["score", "--target", CLOSED, "--timeout-s", "-3", *TOKENS], "--timeout-s must be"),
    "target-huge-timeout": (["generate", "--target", CLOSED, "--timeout-s", "1e12", *TOKENS], "--timeout-s must be"),
    "target-port-out-of-range": (["score", "--target", "localhost:70000", *TOKENS], "--target must be HOST:PORT"),
    # init-model
    "init-model-unknown-preset": (["init-model", "{dir}/new", "--preset", "huge"], "unknown preset 'huge'"),
    "init-model-not-empty": (["init-model", "{m}"], "exists and is not empty"),
    "init-model-onto-a-file": (["init-model", "{plain}"], "exists and is not a directory"),
    "init-model-negative-seed": (["init-model", "{dir}/new", "--seed", "-1"], "--seed"),
    # placement files (checked before Redis is looked for)
    "apply-random-bytes": (["placement", "apply", "{rand}"], "not UTF-8"),
    "apply-invalid-json": (["placement", "apply", "{invalid}"], "not valid JSON"),
    "apply-json-list": (["placement", "apply", "{list}"], "not a placement"),
    "apply-json-wrong-shape": (["placement", "apply", "{wrongshape}"], "not a placement"),
    "apply-pool-without-address": (
        ["placement", "apply", "{noaddress}"],
        'pools[0] is not an object with "pool_id" and "address"',
    ),
    "apply-bad-layer-key": (["placement", "apply", "{badlayer}"], "malformed placement"),
    "apply-missing-file": (["placement", "apply", "{dir}/nothing.json"], "no placement file at"),
    "apply-a-directory": (["placement", "apply", "{dir}"], "cannot read"),
    "plan-random-bytes": (
        ["placement", "plan", "--load", "{rand}", "--pools", "2", "--slots-per-pool", "2"],
        "not UTF-8",
    ),
    "plan-1d-load": (["placement", "plan", "--load", "{load1d}", "--pools", "2", "--slots-per-pool", "2"], "shape [3]"),
    "plan-negative-load": (
        ["placement", "plan", "--load", "{loadneg}", "--pools", "2", "--slots-per-pool", "2"],
        "non-negative",
    ),
    "plan-missing-file": (
        ["placement", "plan", "--load", "{dir}/x.json", "--pools", "2", "--slots-per-pool", "2"],
        "no load file",
    ),
    "plan-zero-pools": (
        ["placement", "plan", "--load", "{load1d}", "--pools", "0", "--slots-per-pool", "2"],
        "--pools",
    ),
    # Redis URLs
    "redis-not-a-url": (["placement", "show", "--redis", "notaurl"], "invalid Redis URL 'notaurl'"),
    "redis-closed-port": (
        ["placement", "show", "--redis", "redis://127.0.0.1:1"],
        "Redis at redis://127.0.0.1:1 is unreachable",
    ),
    "redis-bad-port": (["pools", "list", "--redis", "redis://127.0.0.1:notaport"], "invalid Redis URL"),
    "redis-port-out-of-range": (["rebalance", "--redis", "redis://127.0.0.1:99999"], "invalid Redis URL"),
    "redis-password-hidden": (
        ["load", "top", "--redis", "redis://u:hunter2@127.0.0.1:1/0"],
        "redis://u:***@127.0.0.1:1/0",
    ),
    "redis-none-configured": (["placement", "export", "{dir}/out.json"], "no Redis"),
    "export-closed-redis": (
        ["placement", "export", "{dir}/out.json", "--redis", "redis://127.0.0.1:1"],
        "is unreachable",
    ),
    # click's own usage errors, as one line
    "negative-window": (["load", "top", "--window", "-5"], "Invalid value for '--window'"),
    "rebalance-window-zero": (["rebalance", "--window", "0"], "--window"),
    "drain-negative-window": (["pools", "drain", "pool-0", "--window", "-1"], "--window"),
    "missing-option": (["placement", "replicate", "--layer", "1"], "Missing option '--expert'"),
    "missing-argument": (["pools", "drain"], "Missing argument"),
    "bad-int": (["generate", "--model", "{m}", *TOKENS, "--max-tokens", "abc"], "Invalid value for '--max-tokens'"),
    "unknown-option": (["score", "--bogus"], "No such option: --bogus"),
    "unknown-command": (["frobnicate"], "No such command 'frobnicate'"),
    "unknown-subcommand": (["placement", "frobnicate"], "No such command 'frobnicate'"),
}


def _fill(args: list[str], files: dict[str, str]) -> list[str]:
    return [a.format(**files) if "{" in a else a for a in args]


@pytest.mark.parametrize("case", list(OFFLINE))
def test_bad_invocation_is_one_line_exit_2(case, files):
    args, expected = OFFLINE[case]
    assert_one_line_error(run_cli(_fill(args, files), Path(files["home"])), expected.format(**files))


def test_help_still_works(files):
    for args in (["--help"], ["generate", "--help"], ["placement", "apply", "--help"]):
        proc = run_cli(args, Path(files["home"]))
        assert proc.returncode == 0 and "Usage" in proc.stdout and proc.stderr == "", proc


def test_ctrl_c_is_one_line_exit_130(files):
    """SIGINT while `generate --target` waits on a server that accepts connections and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = dict(os.environ, EXPERTMESH_HOME=files["home"])
        proc = subprocess.Popen(
            [*COMMAND, "generate", "--target", f"127.0.0.1:{silent.getsockname()[1]}", *TOKENS],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        time.sleep(3.0)  # past the imports, into the call
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert err == "expertmesh: interrupted\n" and "Traceback" not in out + err


def test_a_silent_gateway_is_given_up_after_timeout_s(files):
    """A server that accepts connections and never answers: `score --target --timeout-s 1` ends in about a
    second with DEADLINE_EXCEEDED (exit 1: a failure of the service, not of the arguments)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        proc = run_cli(
            ["score", "--target", f"127.0.0.1:{silent.getsockname()[1]}", "--timeout-s", "1", *TOKENS],
            Path(files["home"]),
        )
        took = time.monotonic() - started
    assert proc.returncode == 1 and "DEADLINE_EXCEEDED" in proc.stderr and len(proc.stderr.splitlines()) == 1, proc
    assert took < 8, took  # the 300 s default would not have ended it


def test_init_model_files_are_readable_by_all(tiny_fp8):
    """The shards too (safetensors writes them 0600 and renames): every file gets 0666 less the umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tiny_fp8.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ---- against a live gateway -----------------------------------------------------------------------------------
redis_missing = shutil.which("redis-server") is None


@pytest.fixture(scope="module")
def gateway(tiny_fp8, tmp_path_factory):
    from tests.local_deployment import UpProcess

    up = UpProcess(tiny_fp8, pools=1, dispatch="fp32", home=tmp_path_factory.mktemp("cli-errors-up"))
    yield up.gateway
    up.stop()


ONLINE = {
    "negative-token": (["generate", "--tokens", "-1,5"], "token id -1 is outside the vocabulary [0, 1024)"),
    "token-past-uint32": (["generate", "--tokens", "5,4294967296"], "token id 4294967296 is outside the vocabulary"),
    "token-past-vocab": (["score", "--tokens", "5,99999"], "token id 99999 is outside the vocabulary"),
    "max-tokens-huge": (["generate", *TOKENS, "--max-tokens", "5000000000"], "max_tokens must lie in [1, "),
    "max-tokens-below-uint32": (["generate", *TOKENS, "--max-tokens", "4000000000"], "max_tokens must lie in [1, "),
    "max-tokens-negative": (["generate", *TOKENS, "--max-tokens", "-5"], "max_tokens must be at least 1"),
    "score-top-k-past-vocab": (["score", *TOKENS, "--top-k", "100000"], "top_k must lie in [0, 1024]"),
    "score-top-k-negative": (["score", *TOKENS, "--top-k", "-1"], "--top-k"),
    "generate-top-k-negative": (["generate", *TOKENS, "--top-k", "-1"], "top_k"),
    "temperature-nan": (["generate", *TOKENS, "--temperature", "nan"], "temperature must be a finite number"),
    "temperature-inf": (["generate", *TOKENS, "--temperature", "inf"], "temperature must be a finite number"),
    "top-p-nan": (["generate", *TOKENS, "--temperature", "1", "--top-p", "nan"], "top_p must lie in (0, 1]"),
    "top-p-zero": (["generate", *TOKENS, "--temperature", "1", "--top-p", "0"], "top_p must lie in (0, 1]"),
    "top-p-above-one": (["generate", *TOKENS, "--top-p", "1.5"], "top_p must lie in (0, 1]"),
    "seed-negative": (["generate", *TOKENS, "--seed", "-1"], "seed must lie in"),
    "empty-prompt": (["generate", ""], "the prompt is empty"),
    "empty-text": (["score", "--text", ""], "the prompt is empty"),
}


@pytest.mark.slow
@pytest.mark.skipif(redis_missing, reason="redis-server is not installed (scripts/bootstrap.sh installs it)")
@pytest.mark.parametrize("case", list(ONLINE))
def test_bad_invocation_against_a_gateway(case, gateway, files):
    args, expected = ONLINE[case]
    assert_one_line_error(run_cli([args[0], "--target", gateway, *args[1:]], Path(files["home"])), expected)


@pytest.mark.slow
@pytest.mark.skipif(redis_missing, reason="redis-server is not installed (scripts/bootstrap.sh installs it)")
def test_good_invocation_against_the_same_gateway(gateway, files):
    proc = run_cli(["generate", "--target", gateway, *TOKENS, "--max-tokens", "2", "--json"], Path(files["home"]))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt_token_ids"] == [5, 17] and len(out["token_ids"]) == 2


def test_stale_deployment_state_is_named(tmp_path):
    """An up.json left by a deployment that was killed outright: the admin commands say it is gone."""
    (tmp_path / "up.json").write_text('{"pid": 999999999, "started": 1700000000, "redis": "redis://127.0.0.1:1/0"}')
    assert_one_line_error(run_cli(["placement", "show"], tmp_path), "no running deployment")
