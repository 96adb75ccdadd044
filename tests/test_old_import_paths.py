"""The module paths from before the subpackages still import, as the very modules they
moved to (``textenc._aliases``), so code ported from ComfyUI or written against the
old README keeps working; in a fresh interpreter too, where the old path is the first
thing imported."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from textenc._aliases import OLD_PATHS

ROOT = Path(__file__).resolve().parents[1]

#: Every import the README showed before the subpackages (its examples and the modules
#: and names it points to), word for word where it had a statement.
README_IMPORTS = [
    "from textenc.sd import load_clip",
    "from textenc.sd import CLIP, conditioning_at_step",
    "from textenc.tokenizer import SDTokenizer",
    "from textenc.dialects.compel import empty_conditioning, pad_conditioning_tensors_to_same_length",
    "from textenc.dialects import SYNTAXES, default_weight_mode",
    "from textenc.diffusers import encode_for_pipeline",
    "from textenc.dataset import encode_dataset, open_shards",
    "from textenc.attention import optimized_attention_for_device",
    "from textenc.paths import set_models_dir",
    "from textenc.layers import LayerNumbering",
    "from textenc.errors import TextencError, EmbeddingWarning",
    "from textenc.sd1_clip import SDClipModel",
    "import textenc.sd1_clip",
    "import textenc.sd2_clip",
    "import textenc.sdxl_clip",
    "import textenc.clip_vision",
    "import textenc.ops",
    "import textenc.attention",
    "import textenc.dataset",
    "import textenc.diffusers",
    "import textenc.tokenizer",
    "import textenc.conditioning",
    "import textenc.photomaker",
    "import textenc.config",
    "import textenc.weighting",
    "import textenc.layers",
    "import textenc.paths",
    "import textenc.dialects",
    "import textenc.checkpoint",
    "import textenc.convert",
    "import textenc.clip_model",
    "import textenc.errors",
    "from textenc import sd1_clip, sd2_clip, sdxl_clip, clip_vision, ops, attention, tokenizer, weighting",
]


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_every_old_path_is_the_module_it_moved_to(old):
    new = importlib.import_module(OLD_PATHS[old])
    assert importlib.import_module(old) is new
    assert sys.modules[old] is new and new.__name__ == OLD_PATHS[old]
    parent, _, child = old.rpartition(".")
    assert getattr(importlib.import_module(parent), child) is new  # so `from parent import child` works


def test_the_old_paths_point_at_existing_modules_only():
    for old, new in OLD_PATHS.items():
        assert old.startswith("textenc.") and new.startswith("textenc.") and old != new
        assert importlib.util.find_spec(new) is not None, new


@pytest.mark.parametrize("statement", README_IMPORTS)
def test_the_readmes_imports_work(statement):
    names: dict = {}
    exec(statement, names)  # noqa: S102 - the statement is one of the fixed lines above
    imported = {k: v for k, v in names.items() if k != "__builtins__"}
    assert imported, statement
    if statement.startswith("from "):
        module = importlib.import_module(statement.split()[1])
        for name, value in imported.items():
            expected = getattr(module, name)
            assert value is expected or value is sys.modules.get(f"{module.__name__}.{name}"), name


_FRESH = """
import importlib, sys
statements = sys.argv[1:]
failed = []
for statement in statements:
    # Forget textenc (its modules and the old-path finder) so the statement runs as the
    # first textenc import of the process.
    for name in [n for n in sys.modules if n == "textenc" or n.startswith("textenc.")]:
        del sys.modules[name]
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ != "textenc._aliases"]
    try:
        exec(statement, {})
        from textenc._aliases import OLD_PATHS
        wrong = [old for old, new in OLD_PATHS.items() if old in sys.modules and sys.modules[old] is not sys.modules[new]]
        if wrong:
            failed.append(f"{statement}: {wrong} are not their new modules")
    except Exception as exc:
        failed.append(f"{statement}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_the_readmes_imports_work_as_the_first_import_of_a_process(tmp_path):
    """``import textenc.sd1_clip`` alone installs the finder (textenc/__init__ runs first)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_FRESH), *README_IMPORTS], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_a_fresh_process_sees_the_old_module_as_the_new_one(tmp_path):
    code = ("import textenc.sd1_clip as old, sys; import textenc.text_encoders.sd1_clip as new; "
            "sys.exit(0 if old is new and old.SDClipModel is new.SDClipModel else 1)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
