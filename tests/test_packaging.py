"""The built wheel: textenc plus the node pack as ``textenc_nodes``, nothing named ``nodes``.

One wheel is built (``pip wheel --no-deps --no-build-isolation``) from a copy
of the sources and installed with ``pip install --no-deps --target`` into an
empty folder; imports are then checked in a fresh interpreter that sees only
that folder (plus the venv's dependencies), not this checkout. The README's
ComfyUI install (a symlink ``custom_nodes/textenc_nodes`` -> ``nodes/``) is
loaded the way ComfyUI's ``load_custom_node`` loads a folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and installs the wheel with pip

ROOT = Path(__file__).resolve().parents[1]


def _pip(*args: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if result.returncode != 0:
        pytest.fail(f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("textenc", "nodes"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(source), cwd=out)
    (built,) = out.glob("textenc-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel), cwd=target)
    return target


def _run_python(code: str, *, path: Path, cwd: Path) -> subprocess.CompletedProcess:
    # -I: isolated mode (no cwd, no user site, no PYTHON* variables); the target goes first.
    prelude = f"import sys; sys.path.insert(0, {str(path)!r}); "
    return subprocess.run([sys.executable, "-I", "-c", prelude + code], cwd=cwd, capture_output=True,
                          text=True)


def test_wheel_holds_textenc_and_textenc_nodes_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"textenc", "textenc_nodes", next(t for t in tops if t.endswith(".dist-info"))}
    assert not any(name.startswith("nodes/") for name in names)
    expected = {f"textenc_nodes/{p.name}" for p in (ROOT / "nodes").glob("*.py")}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "textenc").rglob("*.py")}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "textenc").glob("configs/*.json")}
    expected |= {"textenc/vocab/vocab.json", "textenc/vocab/merges.txt"}
    expected |= {"textenc/vocab/t5/tokenizer.json", "textenc/vocab/t5/README.md"}
    assert expected - set(names) == set(), "files missing from the wheel (a subpackage not in pyproject?)"


def test_installed_pack_imports_as_textenc_nodes(installed, tmp_path):
    assert not (installed / "nodes").exists()
    code = ("import importlib.util, textenc, textenc_nodes; "
            f"assert textenc.__file__.startswith({str(installed)!r}), textenc.__file__; "
            f"assert textenc_nodes.__file__.startswith({str(installed)!r}); "
            "assert 'CLIPTextEncode' in textenc_nodes.NODE_CLASS_MAPPINGS; "
            "assert 'torch' not in sys.modules; "
            "spec = importlib.util.find_spec('nodes'); "
            f"assert spec is None or not str(spec.origin).startswith({str(installed)!r}); "
            "print(len(textenc_nodes.NODE_CLASS_MAPPINGS))")
    result = _run_python(code, path=installed, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 15


def test_comfyui_symlink_install_loads_the_pack(installed, tmp_path):
    """README: ``pip install`` the library, ``ln -s .../nodes custom_nodes/textenc_nodes``."""
    custom_nodes = tmp_path / "ComfyUI" / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    (custom_nodes / "textenc_nodes").symlink_to(ROOT / "nodes", target_is_directory=True)
    module_path = str(custom_nodes / "textenc_nodes")
    # As ComfyUI's nodes.load_custom_node: the module is named after its path, with "." -> "_x_",
    # and custom_nodes (not the pack folder) is on sys.path.
    code = ("import importlib.util, os; "
            f"sys.path.insert(0, {str(custom_nodes)!r}); "
            f"module_path = {module_path!r}; "
            "name = module_path.replace('.', '_x_'); "
            "spec = importlib.util.spec_from_file_location(name, os.path.join(module_path, '__init__.py')); "
            "module = importlib.util.module_from_spec(spec); sys.modules[name] = module; "
            "spec.loader.exec_module(module); "
            "assert 'TextencCLIPTextEncode' in module.NODE_CLASS_MAPPINGS; "
            "cls = module.NODE_CLASS_MAPPINGS['CLIPTextEncodeAdvancedTextenc']; "
            "assert 'syntax' in cls.INPUT_TYPES()['optional']; "
            "import textenc; "
            f"assert textenc.__file__.startswith({str(installed)!r}), textenc.__file__; "
            "print('ok')")
    result = _run_python(code, path=installed, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
