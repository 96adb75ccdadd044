"""textenc's import graph, read from its sources: no circle, no import up the layers, and
no import of an old module path.

Every import counts (a lazy or type-only import still ties two modules together):
module-level ones, those inside functions, those under ``if TYPE_CHECKING:``, and
``importlib.import_module`` of a literal name or of ``f"{__name__}.{name}"`` (any module
of that package). Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` and ``a``, so
those are edges too, except the importer's own packages (already being imported).

The layers are the layout's (docs/layout.md), lowest first: a module imports modules of
its own rank or lower; within one rank only the import graph's no-circle rule applies.
The node pack (``nodes/``, installed as ``textenc_nodes``) is an entry point like the CLI.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Top-level package -> its source folder in this checkout.
PACKAGES = {"textenc": ROOT / "textenc", "textenc_nodes": ROOT / "nodes"}

#: Module or package -> layer, lowest first; a name covers its submodules. The bare
#: ``textenc`` (its ``__init__`` installs the old-path aliases) covers only itself
#: (a new top-level module needs a line here).
LAYERS: dict[str, int] = {
    "textenc": 1, "textenc._aliases": 1, "textenc.errors": 1, "textenc.warn": 1, "textenc.lru": 1,
    "textenc.nn": 2, "textenc.loading": 2,
    "textenc.prompts": 3,
    "textenc.text_encoders": 4, "textenc.vision": 4,
    "textenc.sd": 5, "textenc.conditioning": 5,
    "textenc.diffusers": 6, "textenc.load": 6,
    "textenc.commands": 7, "textenc.dataset": 7, "textenc.cli": 7, "textenc.__main__": 7,
    "textenc_nodes": 7,
}


@dataclass(frozen=True)
class Import:
    """One imported name, as written (resolved to an absolute dotted name)."""

    importer: str
    name: str
    line: int
    how: str  # "top", "lazy" or "type-only" (+ ", dynamic"), or "package" (an ancestor's __init__)


# --- reading the sources ------------------------------------------------------------

def _modules(package: str, folder: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under ``folder``."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = (package, *path.relative_to(folder).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _dynamic_target(call: ast.Call, module: str) -> str | None:
    """``importlib.import_module("a.b")`` -> ``"a.b"``; ``import_module(f"{__name__}.{x}")``
    -> ``"<module>.*"`` (any module of that package); anything else -> None."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and len(arg.values) >= 2:
        head, dot = arg.values[0], arg.values[1]
        if (isinstance(head, ast.FormattedValue) and getattr(head.value, "id", None) == "__name__"
                and isinstance(dot, ast.Constant) and str(dot.value).startswith(".")):
            return f"{module}.*"
    return None


def _imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every name ``module`` imports, wherever the statement sits (TYPE_CHECKING included).

    ``from pkg import name`` imports ``pkg.name`` when that is a module, and ``pkg``
    itself, unless ``pkg`` is the importer's own package and every name is a module
    (``from . import sibling`` only reaches the sibling)."""
    home = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node, how in _statements(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno, how) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = home[:len(home) - node.level + 1] if node.level else []
            base = ".".join(base + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
            if base not in _ancestors(module) or not all(name in modules for name in names):
                found.append(Import(module, base, node.lineno, how))
            found += [Import(module, name, node.lineno, how) for name in names if name in modules]
        elif isinstance(node, ast.Call) and (target := _dynamic_target(node, module)):
            found.append(Import(module, target, node.lineno, f"{how}, dynamic"))
    return found


def _statements(tree: ast.Module):
    """Every node of ``tree`` with where it runs: "top" (at import), "lazy" (in a
    function) or "type-only" (under ``if TYPE_CHECKING:``)."""
    pending = [(node, "top") for node in tree.body]
    while pending:
        node, how = pending.pop()
        yield node, how
        for field, value in ast.iter_fields(node):
            children = value if isinstance(value, list) else [value]
            for child in (c for c in children if isinstance(c, ast.AST)):
                inner = how
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and how == "top":
                    inner = "lazy"
                if isinstance(node, ast.If) and field == "body" and "TYPE_CHECKING" in ast.dump(node.test):
                    inner = "type-only"
                pending.append((child, inner))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def read_imports(packages: dict[str, Path] = PACKAGES) -> tuple[dict[str, Path], list[Import]]:
    """(module -> file, every import of those modules), names resolved to modules where
    they are modules of ``packages``, with the ancestor packages each import runs."""
    modules = {m: p for package, folder in packages.items() for m, p in _modules(package, folder).items()}
    imports = []
    for module, path in modules.items():
        for imp in _imports_of(module, path, modules):
            if imp.name.endswith(".*"):  # import_module(f"{__name__}.{x}"): each module of the package
                parent = imp.name[:-2]
                imports += [Import(module, m, imp.line, imp.how) for m in modules
                            if m.rpartition(".")[0] == parent]
                continue
            imports.append(imp)
            own = set(_ancestors(module)) | {module}
            imports += [Import(module, a, imp.line, "package") for a in _ancestors(imp.name)
                        if a in modules and a not in own]
    return modules, imports


def import_graph(packages: dict[str, Path] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports (not itself)."""
    modules, imports = read_imports(packages)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.name in modules and imp.name != imp.importer:
            graph[imp.importer].add(imp.name)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module (each
    module in one of them reaches itself), sorted; Tarjan's algorithm, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return sorted(circles)


def layer(module: str) -> int | None:
    """The rank of ``module`` in :data:`LAYERS` (its longest listed prefix), or None."""
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or (module.startswith(prefix + ".") and prefix != "textenc"):
            return LAYERS[prefix]
    return None


def _edges(imports: list[Import], modules: dict[str, Path], keep) -> list[str]:
    """One line per (importer, imported) pair whose import ``keep`` accepts, with where."""
    places: dict[tuple[str, str], list[str]] = {}
    for imp in imports:
        if keep(imp):
            where = f"{modules[imp.importer].relative_to(ROOT)}:{imp.line}"
            places.setdefault((imp.importer, imp.name), []).append(f"{imp.how} at {where}")
    return [f"{a} -> {b} [{', '.join(sorted(set(p)))}]" for (a, b), p in sorted(places.items())]


# --- the rules ------------------------------------------------------------------------

def test_every_module_has_a_layer():
    modules, _ = read_imports()
    assert len(modules) > 50 and "textenc.prompts.tokenizer" in modules and "textenc_nodes.loaders" in modules
    assert [m for m in modules if layer(m) is None] == []


def test_no_import_circle():
    """No module reaches itself through imports (TYPE_CHECKING and lazy ones included)."""
    modules, imports = read_imports()
    circles = import_circles(import_graph())
    detail = [f"a circle of {len(c)} modules, through:\n  " + "\n  ".join(
        _edges(imports, modules, lambda imp, c=set(c): imp.importer in c and imp.name in c
               and imp.name != imp.importer)) for c in circles]
    assert circles == [], "import circles:\n" + "\n".join(detail)


def test_imports_point_down_the_layers():
    """No module imports one of a higher layer (see :data:`LAYERS`)."""
    modules, imports = read_imports()
    upward = _edges(imports, modules, lambda imp: imp.name in modules and imp.name != imp.importer
                    and (layer(imp.importer) or 0) < (layer(imp.name) or 0))
    assert upward == [], "imports up the layers:\n" + "\n".join(upward)


def test_no_old_import_path_in_the_library():
    """textenc and its nodes import the new paths; the old ones are for users' code only."""
    from textenc._aliases import OLD_PATHS

    modules, imports = read_imports()
    old = _edges(imports, modules, lambda imp: imp.name in OLD_PATHS)
    assert old == [], "old import paths (see textenc._aliases.OLD_PATHS for the new ones):\n" + "\n".join(old)


# --- the walk itself, on a package written for the purpose ------------------------------

_TOY = {
    "__init__.py": "from .low import thing\n",
    "low.py": "thing = 1\n",
    "high.py": "def f():\n    from toy import mid\n",
    "mid.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .high import f\n",
    "sub/__init__.py": "import importlib\n\ndef load(name):\n    return importlib.import_module(f'{__name__}.{name}')\n",
    "sub/a.py": "from .. import low\nimport importlib\nimportlib.import_module('toy.sub.b')\n",
    "sub/b.py": "from toy.sub import a\n",
    "sub/c.py": "from toy.sub import load\n",
    "user.py": "import toy.sub.a\n",
}


@pytest.fixture()
def toy(tmp_path) -> dict[str, Path]:
    for name, text in _TOY.items():
        (tmp_path / "toy" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "toy" / name).write_text(text)
    return {"toy": tmp_path / "toy"}


def test_the_walk_sees_lazy_type_only_relative_and_dynamic_imports(toy):
    graph = import_graph(toy)
    assert graph["toy"] == {"toy.low"}
    assert graph["toy.high"] == {"toy.mid"}  # inside a function
    assert graph["toy.mid"] == {"toy.high"}  # under TYPE_CHECKING
    assert graph["toy.sub"] == {"toy.sub.a", "toy.sub.b", "toy.sub.c"}  # import_module(f"{__name__}.{x}")
    assert graph["toy.sub.a"] == {"toy.low", "toy.sub.b"}  # relative; import_module("...")
    assert graph["toy.sub.b"] == {"toy.sub.a"}  # a sibling through its own package
    assert graph["toy.sub.c"] == {"toy.sub"}  # a name of its own package's __init__
    assert graph["toy.user"] == {"toy.sub", "toy.sub.a"}  # importing toy.sub.a runs toy/sub/__init__
    assert import_circles(graph) == [["toy.high", "toy.mid"], ["toy.sub", "toy.sub.c"], ["toy.sub.a", "toy.sub.b"]]


def test_layer_lookup_takes_the_longest_prefix():
    assert layer("textenc") == 1 and layer("textenc.errors") == 1
    assert layer("textenc.prompts.dialects.a1111.encode") == 3
    assert layer("textenc.diffusers.encode") == 6 and layer("textenc.dataset.engines.ray") == 7
    assert layer("textenc_nodes.loaders") == 7
    assert layer("textenc.somewhere_new") is None  # the bare package covers only itself
