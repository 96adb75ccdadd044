"""Test helper: the modules of a textenc package that import each other around a loop."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path


def _module_name(path: Path, root: Path) -> tuple[str, list[str]]:
    """(dotted module name, the package its relative imports start from)."""
    parts = path.relative_to(root.parent.parent).with_suffix("").parts
    is_init = parts[-1] == "__init__"
    module = ".".join(parts[:-1] if is_init else parts)
    return module, module.split(".") if is_init else module.split(".")[:-1]


def import_graph(package: str) -> dict[str, set[str]]:
    """Module → the modules of ``package`` it imports, imports inside functions included
    (so a lazy import cannot hide a circle). Submodule imports leave out the
    parents' ``__init__`` that Python also runs."""
    root = Path(importlib.import_module(package).__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        module, home = _module_name(path, root)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = home[:len(home) - (node.level - 1)] + ([node.module] if node.module else [])
                deps.add(".".join(base))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package):
                deps.add(node.module)
        graph[module] = {d for d in deps if d.startswith(package) and d != module}
    return graph


def import_circles(package: str) -> list[str]:
    """The modules of ``package`` that reach themselves through its import graph."""
    graph = import_graph(package)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for dep in graph.get(start, ()):
            if dep == goal or (dep not in seen and reaches(dep, goal, seen | {dep})):
                return True
        return False

    return sorted(m for m in graph if reaches(m, m, {m}))
