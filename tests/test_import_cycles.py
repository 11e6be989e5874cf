"""No import cycle in fungi_ops/ or pipelines/: each module's imports point one way.

A cycle is two modules that each need the other (``fungi_ops.dense`` <-> ``fungi_ops.featurizer``
through the dense/global choice, ``pipelines.config`` -> the job's stages -> ``pipelines.formats``
-> ``pipelines.config``): neither can be read, moved or tested alone, and a module-level one
fails at import time depending on which module is imported first. Every ``import`` counts,
also one deferred into a function body (deferring hides a cycle, it does not remove it), except:

* imports under ``if TYPE_CHECKING:`` (annotations only, never executed);
* a module importing its own parent package (Python has imported the parent first anyway:
  ``fungi_ops.adapters.image`` takes its base class from ``fungi_ops.adapters``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fungi_ops", "pipelines")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """The dotted names a module imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of fungi_ops and pipelines it imports."""
    files = {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        names = imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py")
        parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = {name for name in names if name in files and name != module and name not in parents}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state:
                found = walk(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = walk(start)
            if found:
                return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph = {module: targets for module, targets in import_graph().items() if module.split(".")[0] == package}
    graph = {module: {t for t in targets if t in graph} for module, targets in graph.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_and_its_modules():
    """The check itself: a cycle through three modules is reported as that path, a tree is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x.y\ndef f():\n    from . import z\n")
    assert imported_names(tree, "p.m", is_package=False) == {"typing", "typing.TYPE_CHECKING", "p", "p.z"}


def test_formats_do_not_import_the_job():
    """The output formats are read by the job, fungi feast and fungi eval: they must not need the job."""
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if t.startswith("pipelines.job"))
                 for m, targets in graph.items() if m.startswith("pipelines.formats")}
    assert not {m: t for m, t in offenders.items() if t}, offenders
