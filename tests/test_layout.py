"""The import graph of the package: no circles (function-level imports count too: a lazy import is a dependency all
the same), nothing below the face imports the CLI or the API module, and modeling/ (copied into checkpoints)
imports nothing from llmdrop."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "llmdrop"
FACE = {"cli", "api", "__main__", "__init__"}


def imports(path: Path) -> set[str]:
    """The llmdrop modules ``path`` imports (relative or absolute, at module or function level)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmdrop."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("llmdrop.")}
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: (imports(path) & set(modules)) - {name} for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert cycles(graph()) == []


def test_nothing_below_the_face_imports_it():
    below = {name: deps & {"cli", "api"} for name, deps in graph().items() if name not in FACE}
    assert {name: deps for name, deps in below.items() if deps} == {}


def test_modeling_imports_nothing_from_llmdrop():
    for path in (ROOT / "modeling").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("llmdrop"), path
                assert node.level == 0 or node.module in {p.stem for p in (ROOT / "modeling").glob("*.py")}, path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("llmdrop") for a in node.names), path
