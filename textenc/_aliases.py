"""Import paths from before the subpackages: each old dotted name is the module it moved to.

textenc's modules moved into ``nn/``, ``prompts/``, ``text_encoders/``, ``loading/``,
``vision/`` and ``diffusers/`` (``docs/layout.md``). Code written against the old paths
(``from textenc.sd1_clip import SDClipModel``, as ported from ComfyUI's ``comfy.sd1_clip``)
keeps working: :class:`_OldPathFinder`, installed by ``textenc/__init__.py``, answers an
import of an old name with the new module itself (``textenc.sd1_clip is
textenc.text_encoders.sd1_clip``), so classes, ``isinstance`` and monkeypatching agree.
It is consulted first, and answers only the names below (so that a stale ``__pycache__``
folder or namespace package left where an old module was cannot shadow the move); textenc's own code imports the new paths
(``tests/test_import_graph.py`` refuses an old one).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

__all__ = ["OLD_PATHS", "install"]

#: old dotted name -> where the module lives now.
OLD_PATHS: dict[str, str] = {
    "textenc.ops": "textenc.nn.ops",
    "textenc.attention": "textenc.nn.attention",
    "textenc.clip_layers": "textenc.nn.clip_layers",
    "textenc.clip_model": "textenc.nn.clip_model",
    "textenc.config": "textenc.nn.config",
    "textenc.tokenizer": "textenc.prompts.tokenizer",
    "textenc.prompt_parser": "textenc.prompts.parser",
    "textenc.prompt_brackets": "textenc.prompts.brackets",
    "textenc.prompt_units": "textenc.prompts.units",
    "textenc.window_packing": "textenc.prompts.packing",
    "textenc.token_budget": "textenc.prompts.budget",
    "textenc.clip_backend": "textenc.prompts.clip_backend",
    "textenc.inspect_report": "textenc.prompts.report",
    "textenc.dialect_limits": "textenc.prompts.limits",
    "textenc.step_ranges": "textenc.prompts.step_ranges",
    "textenc.dialects": "textenc.prompts.dialects",
    "textenc.dialects.comfy": "textenc.prompts.dialects.comfy",
    "textenc.dialects.compel": "textenc.text_encoders.compel",
    "textenc.dialects.compel_grammar": "textenc.prompts.dialects.compel.grammar",
    "textenc.dialects.compel_parser": "textenc.prompts.dialects.compel.parser",
    "textenc.dialects.compel_tokens": "textenc.prompts.dialects.compel.tokens",
    "textenc.dialects.compel_weighting": "textenc.text_encoders.weighting.compel",
    "textenc.dialects.a1111": "textenc.prompts.dialects.a1111",
    "textenc.dialects.a1111.attention": "textenc.prompts.dialects.a1111.attention",
    "textenc.dialects.a1111.chunks": "textenc.prompts.dialects.a1111.chunks",
    "textenc.dialects.a1111.dialect": "textenc.prompts.dialects.a1111.dialect",
    "textenc.dialects.a1111.encode": "textenc.text_encoders.schedules",
    "textenc.dialects.a1111.report": "textenc.prompts.dialects.a1111.report",
    "textenc.dialects.a1111.schedule": "textenc.prompts.dialects.a1111.schedule",
    "textenc.embeddings": "textenc.loading.embeddings",
    "textenc.embedding_files": "textenc.loading.embedding_file",
    "textenc.checkpoint": "textenc.loading.checkpoint",
    "textenc.checkpoint_pickle": "textenc.loading.torch_pickle",
    "textenc.convert": "textenc.loading.convert",
    "textenc.detect": "textenc.loading.detect",
    "textenc.text_encoder_files": "textenc.loading.text_encoders",
    "textenc.paths": "textenc.loading.paths",
    "textenc.sd1_clip": "textenc.text_encoders.sd1_clip",
    "textenc.sd2_clip": "textenc.text_encoders.sd2_clip",
    "textenc.sdxl_clip": "textenc.text_encoders.sdxl_clip",
    "textenc.sd1_encode": "textenc.text_encoders.encode",
    "textenc.clip_options": "textenc.text_encoders.options",
    "textenc.layers": "textenc.text_encoders.clip_skip",
    "textenc.weighting": "textenc.text_encoders.weighting",
    "textenc.clip_vision": "textenc.vision.clip_vision",
    "textenc.photomaker": "textenc.vision.photomaker",
    "textenc.diffusers_encode": "textenc.diffusers.encode",
    "textenc.diffusers_layers": "textenc.diffusers.layers",
    "textenc.diffusers_load": "textenc.diffusers.load",
}


class _Alias(importlib.abc.Loader):
    """Loads an old name by importing the new module and putting it in its place."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a placeholder; exec_module puts the real module in sys.modules

    def exec_module(self, module: types.ModuleType) -> None:
        # The import system returns what sys.modules holds after exec_module.
        sys.modules[module.__name__] = importlib.import_module(self.target)


def _has_children(name: str) -> bool:
    """An old package (``textenc.dialects``): its old submodules are found through it."""
    return any(other.startswith(name + ".") for other in OLD_PATHS)


class _OldPathFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        new = OLD_PATHS.get(name)
        if new is None:
            return None
        return importlib.util.spec_from_loader(name, _Alias(new), is_package=_has_children(name))


def install() -> None:
    """Put the finder at the front of ``sys.meta_path`` (once): before the path finder,
    which would otherwise load an old submodule of an old package (``textenc.dialects.compel``)
    a second time from the new package's folder, or not at all."""
    if not any(isinstance(finder, _OldPathFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldPathFinder())
