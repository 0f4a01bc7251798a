"""The image's Python environment, built as the Dockerfile builds it, and every service started from it.

No Docker engine runs on the project's machines, so this reads the Dockerfile and plays its build: ARG defaults,
ENV, WORKDIR and COPY into a temporary folder, and every RUN that installs or imports (the same shell lines, the
same pip requirements) with a fresh virtual environment's pip and python first on PATH (no system site-packages).
Only where the wheels come from differs: a wheelhouse filled beforehand by `pip download` (from this machine's
pip configuration and, when reachable, the PyTorch CPU index), and the Dockerfile's pip lines run with
PIP_NO_INDEX, so they resolve exactly the Dockerfile's requirements, offline. Then each entry point the chart
starts runs `--help` from outside the source tree, and every module of `services` imports.

About two minutes here (most of it unpacking torch): marked slow.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
ENTRY_POINTS = [  # what the chart's pods and an operator's shell run
    ["python", "-m", "services.gateway.main", "--help"],
    ["python", "-m", "services.expert.server", "--help"],
    ["python", "-m", "services.autoscaler.service", "--help"],
    ["expertmesh", "--help"],
]

pytestmark = pytest.mark.slow


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined as Docker joins them."""
    joined = text.replace("\\\n", "")
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _build_args(build: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for word, rest in build:
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                args[name] = value
    return args


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _wheelhouse(tmp: Path, context: Path) -> Path:
    """Every wheel the Dockerfile's pip lines may ask for, with torch's CPU build."""
    house = tmp / "wheels"
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(house)]
    torch = subprocess.run([*pip, "--no-deps", "--no-index", "torch==2.13.0"], capture_output=True, text=True)
    if torch.returncode != 0:  # no local copy: the CPU index, as the Dockerfile's default
        torch = subprocess.run(
            [
                *pip,
                "--no-deps",
                "--retries",
                "1",
                "--timeout",
                "20",
                "--index-url",
                "https://download.pytorch.org/whl/cpu",
                "torch==2.13.0",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if torch.returncode != 0:
            pytest.skip("torch 2.13.0's CPU wheel is neither on this machine nor downloadable: " + torch.stderr[-300:])
    _run([*pip, "--find-links", str(house), str(context)])
    return house


def _copy(rest: str, source_root: Path, app: Path) -> None:
    *sources, _dest = shlex.split(rest)
    for source in sources:
        src = source_root / source
        if src.is_dir():
            shutil.copytree(src, app / src.name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, app / src.name)


def _play(build, args: dict[str, str], context: Path, app: Path, env: dict[str, str]) -> list[str]:
    """COPY (from the build context) and every RUN that installs or imports, in order; returns the RUN lines."""
    played = []
    for word, rest in build:
        if word == "COPY":
            _copy(rest, context, app)
        elif word == "RUN" and ("pip " in rest or "python " in rest):
            _run(["/bin/sh", "-c", rest], cwd=app, env={**env, **args})
            played.append(rest)
    return played


def test_image_environment_starts_every_service(tmp_path):
    build = instructions(DOCKERFILE.read_text())
    args = _build_args(build)
    assert args["DEVICE"] == "cpu", "the default image is the CPU one"
    app = tmp_path / "app"
    app.mkdir()
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    assert "include-system-site-packages = false" in (env_dir / "pyvenv.cfg").read_text()
    context = tmp_path / "context"  # the build context, taken once: what pip downloads for is what it installs
    context.mkdir()
    for word, rest in build:
        if word == "COPY":
            _copy(rest, ROOT, context)
    house = _wheelhouse(tmp_path, context)
    env = {
        "PATH": f"{env_dir / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PIP_NO_INDEX": "1",  # beats the Dockerfile's --index-url: resolved from the wheelhouse only
        "PIP_FIND_LINKS": str(house),
        "PIP_CONFIG_FILE": os.devnull,  # this machine's pip.conf adds indexes and find-links of its own
    }
    played = _play(build, args, context, app, env)
    assert len(played) == 2 and "torch==2.13.0" in played[0] and "pip install" in played[1], played
    python = env_dir / "bin" / "python"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run_env = {"PATH": env["PATH"], "HOME": str(tmp_path)}
    where = _run(
        [str(python), "-c", "import services, torch; print(services.__file__, torch.__version__)"],
        cwd=outside,
        env=run_env,
    ).stdout
    assert str(env_dir) in where and "+cpu" in where, where
    for cmd in ENTRY_POINTS:
        result = _run(cmd, cwd=outside, env=run_env)
        assert "usage" in result.stdout.lower(), (cmd, result.stdout)
    every_module = (
        "import pkgutil, importlib, services\n"
        "for m in pkgutil.walk_packages(services.__path__, 'services.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    _run([str(python), "-c", every_module], cwd=outside, env=run_env)
