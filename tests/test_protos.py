"""The wire API: buf lint is clean, and the committed stubs are exactly what grpcio-tools generates."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"


def test_generated_stubs_are_current(tmp_path):
    pytest.importorskip("grpc_tools")
    sources = sorted(p.relative_to(PROTOS) for p in (PROTOS / "expertmesh" / "v1").glob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *map(str, sources),
        ],
        check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc generated nothing"
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, PROTOS / p, shallow=False)]
    assert stale == [], f"regenerate with scripts/gen_protos.sh: {stale}"


def test_buf_lint_clean():
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    if not Path(buf).exists():
        pytest.skip("buf is not installed (the test extra installs buf-bin)")
    result = subprocess.run([buf, "lint"], cwd=PROTOS, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
