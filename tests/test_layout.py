"""The import graph of the package: no circles (function-level imports count too: a lazy import is a dependency all
the same), nothing below the face imports the CLI or the API module, and modeling/ (copied into checkpoints)
imports nothing from llmdrop."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "llmdrop"
FACE = {"api", "__main__", "__init__"}  # and the cli package


def module_name(path: Path) -> str:
    """llmdrop/cli/drop.py -> "cli.drop"; a package's __init__.py -> the package ("cli")."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def imports(path: Path, modules: set[str]) -> set[str]:
    """The llmdrop modules ``path`` imports (relative or absolute, at module or function level)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            elif (node.module or "").startswith("llmdrop"):
                base = []
            else:
                continue
            module = (node.module or "").removeprefix("llmdrop").removeprefix(".") if not node.level else node.module
            target = [*base, *(module.split(".") if module else [])]
            candidates = [".".join([*target, a.name]) for a in node.names] + [".".join(target)]
            found |= {c for c in candidates if c in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("llmdrop.") for a in node.names if a.name.removeprefix("llmdrop.") in modules}
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py") if "data" not in p.relative_to(PACKAGE).parts}
    return {name: imports(path, set(paths)) - {name} for name, path in paths.items()}


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
    def face(name):
        return name in FACE or name == "cli" or name.startswith("cli.")

    below = {name: {d for d in deps if face(d)} for name, deps in graph().items() if not face(name)}
    assert {name: deps for name, deps in below.items() if deps} == {}


# The pipeline's stages, lowest first: a module imports only from its own stage or from lower ones. Shared helpers
# (errors, files, record, compat, report) are below every stage; the request, the API and the CLI are the face.
STAGES = ["shared", "source", "passes", "planning", "formats", "checkpoints|serving|analysis", "autosearch", "face"]
SHARED = {"errors", "files", "record", "compat", "report"}
# Loading asks the exporter registry whether a folder is an export of a format that runs llmdrop's remote code (the
# registry owns recognising its exports): the one import up the stages, lazy.
UPWARD = {("source.models", "formats.exporters")}


def stage(module: str) -> int:
    top = module.split(".")[0]
    if top in SHARED:
        return 0
    if top in FACE or top in {"cli", "request"}:
        return len(STAGES) - 1
    return next(i for i, s in enumerate(STAGES) if top in s.split("|"))


def test_every_module_has_a_stage():
    assert {m: stage(m) for m in graph()}  # raises StopIteration for a top-level name no stage claims


def test_imports_go_down_the_stages():
    upward = {(a, b) for a, deps in graph().items() for b in deps if stage(b) > stage(a)}
    assert upward == UPWARD


def test_every_package_is_in_the_wheel():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"llmdrop." + ".".join(p.parent.relative_to(PACKAGE).parts) for p in PACKAGE.rglob("__init__.py")}
    assert {name.rstrip(".") for name in found} | {"llmdrop.modeling"} == listed


def test_the_graph_sees_relative_imports_in_packages():
    edges = graph()
    assert "api" in edges["cli.drop"] and "cli.common" in edges["cli.drop"] and "errors" in edges["cli.common"]


def test_modeling_imports_nothing_from_llmdrop():
    for path in (ROOT / "modeling").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("llmdrop"), path
                assert node.level == 0 or node.module in {p.stem for p in (ROOT / "modeling").glob("*.py")}, path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("llmdrop") for a in node.names), path
