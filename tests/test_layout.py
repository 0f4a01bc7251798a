"""The package ladder: errors/settings <- format <- math <- rpc/state/dispatch <- attention/expert <- gateway <-
autoscaler <- cli. Nothing imports upward (lazy imports inside functions count too), no module imports itself
back through others, and modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "services"
MAY_IMPORT = {  # package -> the packages below it
    "errors": set(),
    "settings": set(),
    "format": {"errors"},
    "math": {"errors", "format"},
    "rpc": {"errors", "settings"},
    "state": {"errors", "format", "rpc"},
    "dispatch": {"errors", "format", "math"},
    "attention": {"errors", "format", "math"},
    "expert": {"errors", "format", "math", "rpc", "state", "dispatch"},
    "gateway": {"errors", "settings", "format", "math", "rpc", "state", "dispatch", "attention", "expert"},
    "autoscaler": {"errors", "settings", "format", "math", "rpc", "state", "dispatch", "expert"},
    "training": {"errors", "settings", "format", "math", "attention", "gateway"},
    "cli": {
        "errors",
        "settings",
        "format",
        "math",
        "rpc",
        "state",
        "dispatch",
        "attention",
        "expert",
        "gateway",
        "autoscaler",
        "training",
    },
}
# the in-process facade is the one gateway module that holds the experts in process
IN_PROCESS_FACADE = {"services.gateway.engine"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SERVICES.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("services.")}


def _package(module: str) -> str:
    return module.split(".")[1]


def test_nothing_imports_upward():
    bad = []
    for module, path in _modules().items():
        if module == "services":
            continue
        pkg = _package(module)
        for target in _imports(path):
            if target.split(".")[1] != pkg and target.split(".")[1] not in MAY_IMPORT[pkg]:
                bad.append(f"{module} imports {target}")
    assert not bad, "\n".join(bad)


def test_the_serving_core_does_not_hold_experts_in_process():
    mods = _modules()
    bad = [
        f"{m} imports {t}"
        for m, p in mods.items()
        if m.startswith("services.gateway") and m not in IN_PROCESS_FACADE
        for t in _imports(p)
        if t.startswith("services.expert")
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    mods = _modules()
    graph = {
        m: {t if t in mods else t.rsplit(".", 1)[0] for t in _imports(p)} & set(mods) - {m} for m, p in mods.items()
    }
    graph = {m: {t for t in deps if not m.startswith(t + ".") and t != "services"} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(t) :], t]))
            if t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_modules_stay_small():
    big = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in SERVICES.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    ]
    assert not big, "\n".join(big)


def test_functions_stay_short():
    """Bodies (after the signature and docstring) of at most 60 lines: a typer command's one-option-per-line
    signature is its interface, not its logic."""
    long = []
    for path in SERVICES.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
                lines = node.end_lineno - body[0].lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)
