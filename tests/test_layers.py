"""The layers stay true: core <- integrations <- steps <- adapters, no import cycles, and the core
free of MLflow, boto3 and kfp. Read from the source (every import, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("segcore", "components", "pipelines")
INTEGRATIONS = ("segcore.tracking", "segcore.storage", "segcore.mlflow_model")
STEPS = ("segcore.steps",)
ADAPTERS = ("segcore.cli", "segcore.commands", "components", "pipelines")
EDGE_LIBRARIES = ("mlflow", "boto3", "botocore", "kfp")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (absolute or relative, top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    def within(prefixes):
        return any(module == p or module.startswith(p + ".") for p in prefixes)

    if within(ADAPTERS):
        return "adapter"
    if within(STEPS):
        return "step"
    if within(INTEGRATIONS):
        return "integration"
    return "core"


RANK = {"core": 0, "integration": 1, "step": 2, "adapter": 3}


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{src} ({_layer(src)}) imports {dst} ({_layer(dst)})"
        for src, targets in graph.items()
        for dst in targets
        if dst in MODULES and RANK[_layer(dst)] > RANK[_layer(src)]
    ]


def test_imports_point_down_the_layers():
    wrong = _upward(GRAPH)
    assert not wrong, "\n".join(sorted(wrong))


def test_segcore_imports_neither_components_nor_pipelines():
    wrong = [
        f"{src} imports {dst}"
        for src, targets in GRAPH.items()
        if src.startswith("segcore")
        for dst in targets
        if dst.split(".")[0] in ("components", "pipelines")
    ]
    assert not wrong, wrong


def test_components_take_nothing_from_cli_modules():
    wrong = [
        f"{src} imports {dst}"
        for src, targets in GRAPH.items()
        if src.startswith("components")
        for dst in targets
        if dst == "segcore.cli" or dst.startswith("segcore.commands")
    ]
    assert not wrong, wrong


def test_core_uses_no_edge_library():
    wrong = [
        f"{src} imports {dst}"
        for src, targets in GRAPH.items()
        if src.startswith("segcore") and _layer(src) == "core"
        for dst in targets
        if dst.split(".")[0] in EDGE_LIBRARIES
    ]
    assert not wrong, wrong


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (more than one module) of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in graph or nxt == node:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return cycles


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, cycles


def test_the_check_sees_a_cycle_and_an_upward_import():
    """The checks above are not vacuous: the graph has edges, and a planted cycle is found."""
    assert "segcore.steps" in GRAPH["segcore.commands.train"]
    assert "segcore.training" in GRAPH["segcore.steps.train"]
    planted = {name: set(targets) for name, targets in GRAPH.items()}
    planted["segcore.export"].add("segcore.inference")  # inference imports export already
    assert ["segcore.export", "segcore.inference"] in _cycles(planted)
    planted["segcore.training"].add("segcore.tracking")
    assert any("segcore.training (core) imports segcore.tracking" in line for line in _upward(planted))


MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 220


def test_units_a_reader_can_hold_in_their_head():
    """No function over ~80 lines, no class over ~200 (docstrings and signatures included)."""
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and lines > MAX_FUNCTION_LINES:
                long.append(f"{name}.{node.name}: {lines} lines")
            elif isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES:
                long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long
