"""The light clients: `generate/score --target` and the admin commands never import torch, numpy's model code or
the model (startup time is what a shell loop of calls pays; bench_cli_startup.py measures it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from services.cli.app import main
sys.argv = ["expertmesh", *{args!r}]
try:
    main()
except SystemExit:
    pass
HEAVY = ("torch", "transformers", "services.gateway.model", "services.expert.store")
heavy = sorted(m for m in HEAVY if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--target", "127.0.0.1:1", "--tokens", "1,2"],
        ["score", "--target", "127.0.0.1:1", "--tokens", "1,2"],
        ["placement", "show", "--redis", "redis://127.0.0.1:1/0"],
        ["--help"],
    ],
)
def test_light_commands_import_no_torch(args):
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
