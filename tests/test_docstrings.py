"""Every public class, function and method in ``fungi_ops`` has a docstring."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fungi_ops"
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _missing(tree: ast.Module, path: Path) -> list[str]:
    """``file:line name`` of public module- and class-level definitions without a docstring."""
    missing: list[str] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if not isinstance(node, DEFINITIONS) or node.name.startswith("_"):
                continue
            qualname = f"{prefix}{node.name}"
            if ast.get_docstring(node) is None:
                missing.append(f"{path}:{node.lineno} {qualname}")
            if isinstance(node, ast.ClassDef):  # methods and nested classes; not functions' locals
                visit(node.body, f"{qualname}.")

    visit(tree.body, "")
    return missing


def test_public_definitions_have_docstrings() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, f"no Python files under {PACKAGE}"
    missing = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        missing += _missing(tree, path.relative_to(PACKAGE.parent))
    assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)
