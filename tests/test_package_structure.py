"""The package's import graph: no cycles, and no module importing another module's private names.

Read from the source with ``ast`` (nothing is imported), counting imports inside functions too: a
cycle through a deferred import is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank_compress"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import of a package module in ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target not in MODULES:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            taken = [n for n in names if f"{target}.{n}" not in MODULES]
            if taken or node.module:  # "from . import module" imports only the module
                found.append((target, taken))
            found.extend((s, []) for s in submodules)
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name in MODULES)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_the_package():
    assert {"lowrank_compress", "lowrank_compress.cli.app", "lowrank_compress.io.format"} <= set(MODULES)
    assert ("lowrank_compress.io.files", ["atomic_output"]) in GRAPH["lowrank_compress.io.format"]


def test_the_package_has_no_import_cycles():
    # A package's __init__ runs before its modules, so an import of the package itself is no edge.
    graph = {m: {t for t, _ in edges if not m.startswith(t + ".")} for m, edges in GRAPH.items()}
    assert _cycles(graph) == []


def test_a_cycle_is_detected():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_another_modules_private_names(module):
    private = [f"{target}.{n}" for target, names in GRAPH[module] for n in names
               if n.startswith("_") and not n.startswith("__") and target != module]
    assert private == []


def test_the_runtime_never_imports_the_examples():
    # Only the demo command loads the examples (files naming the old ``lowrank_compress.digits`` load
    # through io.archspec's alias, which imports nothing).
    outside = {m for m in GRAPH if not m.startswith("lowrank_compress.examples")} - {"lowrank_compress.cli.demo"}
    assert [m for m in sorted(outside) if any(t.startswith("lowrank_compress.examples") for t, _ in GRAPH[m])] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_400_lines(module):
    assert len(MODULES[module].read_text().splitlines()) <= 400


def test_a_cli_command_body_is_short():
    # The options are declared in the signature; the body parses, calls one library function, renders.
    long = []
    for name, path in MODULES.items():
        if name.startswith("lowrank_compress.cli."):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef) and node.name.endswith("_command"):
                    body = node.end_lineno - node.body[0].lineno + 1
                    if body > 40:
                        long.append(f"{name}.{node.name}: {body} lines")
    assert long == []
