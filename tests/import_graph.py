"""Test helper: the import graph of a textenc package, read from its sources, and the
modules that import themselves around a loop.

Every import counts: those inside functions (a lazy import cannot hide a circle) and
those under ``if TYPE_CHECKING:`` (a type-only import is still a dependency, and a
circle through one is a circle in the design). ``from pkg import mod`` counts as an
import of ``pkg.mod`` when that is a module of the package.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path


def _imports(tree: ast.Module) -> list[ast.stmt]:
    """Every import statement of a module, nested ones and ``if TYPE_CHECKING:`` ones included."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        else:
            pending.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    """Module of ``package`` → the modules of ``package`` it imports."""
    root = Path(importlib.import_module(package).__file__).parent
    top = Path(importlib.import_module(package.split(".")[0]).__file__).parent.parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(top).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        home = module.split(".") if is_package else module.split(".")[:-1]
        deps: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = (home[:len(home) - (node.level - 1)] if node.level else []) + \
                    ([node.module] if node.module else [])
                deps.add(".".join(base))
                deps.update(f"{'.'.join(base)}.{alias.name}" for alias in node.names)
            else:
                deps.update(alias.name for alias in node.names)
        graph[module] = {d for d in deps if d != module}
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def import_circles(package: str) -> list[str]:
    """The modules of ``package`` that reach themselves through its import graph."""
    graph = import_graph(package)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for dep in graph.get(start, ()):
            if dep == goal or (dep not in seen and reaches(dep, goal, seen | {dep})):
                return True
        return False

    return sorted(m for m in graph if reaches(m, m, {m}))
