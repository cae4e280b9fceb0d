"""The package's imports run one way: no module imports, directly or through others, a module that imports it.

Function-local imports count too (an import inside a function hides an edge, it does not remove it). Each file is
a node; `from . import x` and `from .pkg import name` resolve to the file they name.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "discoalign"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (an imported name may be a function)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] or [base]
            for target in targets:
                found = _resolve(target, modules)
                # a package's __init__ re-exporting its own modules is not an edge back up
                if found and found != module and not module.startswith(found + "."):
                    graph[module].add(found)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert len(graph) > 50 and graph["discoalign.models.lora"]  # the walk really read the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_source_file_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, f"split these files (one idea per file): {long}"


# The files where the decisions of a run used to pile up: each function stays readable at a glance.
SHORT_FUNCTION_FILES = ("config/validate.py", "models/loader.py", "cli/main.py", "train/dpo/trainer.py")


def test_no_function_over_80_lines_where_decisions_are_made():
    long = {
        f"{name}:{node.name}": node.end_lineno - node.lineno + 1
        for name in SHORT_FUNCTION_FILES
        for node in ast.walk(ast.parse((PACKAGE / name).read_text()))
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80
    }
    assert not long, f"split these functions: {long}"


# Sub-packages from the top layer down: a module may import its own layer and the layers below it only.
LAYERS = ("cli", "serve", "export", "train", "eval", "models", "data", "config", "losses", "errors")


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_layers_import_one_way():
    graph = import_graph()
    back = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if _layer(a) is not None and _layer(b) is not None and _layer(b) < _layer(a)
    )
    assert not back, "imports against the layering " + " > ".join(LAYERS) + ": " + "; ".join(back)
