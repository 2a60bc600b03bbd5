"""The package's layering, read from the source (``ast``, nothing imported): the library never imports the
application (fastcache.app: the command, training, data, benchmark harness), and fastcache's modules import each
other without cycles.

An edge A -> B is an import statement in module A that names module B: ``import a.b`` and ``from a.b import x`` name
``a.b``, or ``a.b.x`` where that is a module (the convention of import-linter). Imports inside functions count (a
lazy import is still a dependency); imports under ``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "fastcache"
APP = "fastcache.app"
# the entry point of `python -m fastcache`: part of the command, never imported by the library
ENTRY_POINTS = {"fastcache.__main__"}
# compiled modules (setup.py), which import nothing of fastcache's; named here so that `from fastcache import _C`
# reads the same with the extension built or not
EXTENSIONS = {"fastcache._C"}


def _module_names() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = ("fastcache", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _module_names()
PYTHON_MODULES = dict(MODULES)
MODULES.update({name: None for name in EXTENSIONS})


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """The Import / ImportFrom nodes of ``tree``, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports(name: str, path: Path) -> set[str]:
    """The fastcache modules that module ``name`` (at ``path``) imports."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                       for alias in node.names]
        for target in targets:
            while target and target not in MODULES:  # `import fastcache.ops.x.attr`-style names: the module part
                target = target.rpartition(".")[0]
            if target.startswith("fastcache") and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in PYTHON_MODULES.items()}


def _in_app(name: str) -> bool:
    return name == APP or name.startswith(APP + ".")


def _groups(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm), each sorted."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(groups)


def _shortest_cycle(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A shortest cycle [start, ..., start] (breadth-first), or None."""
    parents, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for other in sorted(graph.get(node, ())):
                if other == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if other not in parents:
                    parents[other] = node
                    following.append(other)
        frontier = following
    return None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle through each module that is on one, each written from its first module in sorted order,
    without repeats: [a, b, ..., a]."""
    cycles = set()
    for group in _groups(graph):
        for module in group:
            cycle = _shortest_cycle(graph, module)[:-1]
            first = cycle.index(min(cycle))
            cycles.add((*cycle[first:], *cycle[:first], cycle[first]))
    return [list(cycle) for cycle in sorted(cycles)]


def test_the_module_walk_sees_the_package():
    assert {"fastcache", "fastcache.ops.contrastive", "fastcache.app.cli", "fastcache.app.harness"} <= set(MODULES)
    assert "fastcache.app.harness" in GRAPH["fastcache.app.benchmark"]  # the walk finds imports


def test_the_library_never_imports_the_application():
    offenders = {name: sorted(filter(_in_app, imported)) for name, imported in GRAPH.items()
                 if not _in_app(name) and name not in ENTRY_POINTS and any(map(_in_app, imported))}
    assert not offenders, f"library modules that import {APP}: {offenders}"


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"c"}, "e": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"], ["c", "d", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


CYCLES = _cycles(GRAPH)
# Imports point down: each op family is a package whose lower modules never import the upper ones, the Triton kernel
# modules are imported by the ops' host code and import nothing of fastcache.ops, and the oracle checks the ops
# without importing them.
INDEPENDENT = {"fastcache.triton": "fastcache.ops", "fastcache.reference": "fastcache.ops"}


def _listed(cycles: list[list[str]]) -> str:
    return "; ".join(" -> ".join(cycle) for cycle in cycles)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_walk_sees_lazy_imports():
    """The op imports its tiled strategy (and so Triton) only when that runs: an edge all the same, so a cycle
    through it would be found."""
    assert "fastcache.ops.contrastive.tiled" in GRAPH["fastcache.ops.contrastive.op"]
    assert "fastcache.ops.matryoshka.tiled" in GRAPH["fastcache.ops.matryoshka.op"]
    assert "fastcache.triton.contrastive" in GRAPH["fastcache.ops.contrastive.tiled"]


def test_no_import_cycles():
    assert not CYCLES, f"import cycles: {_listed(CYCLES)}"


@pytest.mark.parametrize("lower, upper", list(INDEPENDENT.items()))
def test_kernels_and_oracle_import_no_op(lower, upper):
    offenders = {name: sorted(m for m in imported if _under(m, upper))
                 for name, imported in GRAPH.items() if _under(name, lower)}
    offenders = {name: found for name, found in offenders.items() if found}
    assert not offenders, f"{lower} must not import {upper}: {offenders}"
