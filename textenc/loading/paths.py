"""Where model files live: ComfyUI's ``folder_paths`` when running inside
ComfyUI, else a models directory of our own.

Outside ComfyUI the models directory is, in order: the folder given to
:func:`set_models_dir`, the ``TEXTENC_MODELS_DIR`` environment variable, or
none (every list is then empty). Below it, each kind of model has its
folder(s), named as in ComfyUI::

    models/
      text_encoders/  (or clip/)   text encoders (also .gguf) and full checkpoints
      clip_vision/                 CLIP vision towers
      embeddings/                  textual inversions
      photomaker/                  PhotoMaker ID encoders

Names are paths relative to a kind's folder (``"sd15/clip_l.safetensors"``).
A name must be one the folder lists: absolute paths and names with ``..`` are
refused, so a name coming from a workflow can never make textenc read a file
the folder does not list. Symlinked files and folders inside a models folder
are followed wherever they point, as ComfyUI does (shared model folders are
often made of symlinks): whoever can place a link there chose that file.

Nothing here imports torch; listing is cheap enough for ``INPUT_TYPES``.

>>> set_models_dir("/nonexistent")
>>> get_filename_list("clip_vision")
[]
>>> set_models_dir(None)
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Sequence

from ..errors import CheckpointError

__all__ = ["KINDS", "MODEL_EXTENSIONS", "EXTRA_EXTENSIONS", "ENV_VAR", "set_models_dir", "models_dir",
           "comfy_folder_paths", "kind_folders", "get_filename_list", "get_full_path",
           "embedding_directories", "is_inside"]

ENV_VAR = "TEXTENC_MODELS_DIR"
#: Kind -> subfolders searched, in order. ComfyUI renamed ``clip`` to ``text_encoders``
#: and still reads both; "clip" is accepted as an alias of "text_encoders".
KINDS: dict[str, tuple[str, ...]] = {
    "text_encoders": ("text_encoders", "clip"),
    "clip": ("text_encoders", "clip"),
    "clip_vision": ("clip_vision",),
    "embeddings": ("embeddings",),
    "photomaker": ("photomaker",),
    "checkpoints": ("checkpoints",),
}
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
#: Extensions a kind lists beyond MODEL_EXTENSIONS: GGUF T5 / UMT5 files (the format of
#: ComfyUI-GGUF's text-encoder loaders) are text encoders. Inside ComfyUI, whose folder lists
#: leave them out, they are found by walking ComfyUI's folders of that kind.
EXTRA_EXTENSIONS: dict[str, tuple[str, ...]] = {"text_encoders": (".gguf",), "clip": (".gguf",)}

_explicit_dir: str | None = None


def set_models_dir(path: str | os.PathLike[str] | None) -> None:
    """Use ``path`` as the models directory (None: fall back to ``TEXTENC_MODELS_DIR``)."""
    global _explicit_dir
    _explicit_dir = os.fspath(path) if path is not None else None


def models_dir() -> str | None:
    """The models directory in effect, or None when none is configured."""
    return _explicit_dir or os.environ.get(ENV_VAR) or None


def comfy_folder_paths() -> ModuleType | None:
    """ComfyUI's ``folder_paths`` module when running inside ComfyUI, else None.

    Only an already-imported module counts (ComfyUI imports it before any
    custom node), so an unrelated ``folder_paths`` on ``sys.path`` is never
    picked up by accident.
    """
    import sys

    module = sys.modules.get("folder_paths")
    if module is None or not hasattr(module, "get_filename_list"):
        return None
    return module


def _check_kind(kind: str) -> tuple[str, ...]:
    if kind not in KINDS:
        raise CheckpointError(f"unknown model kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind]


def kind_folders(kind: str) -> list[str]:
    """Existing folders (real paths) searched for ``kind`` in our models directory."""
    subfolders = _check_kind(kind)
    root = models_dir()
    if root is None:
        return []
    found = []
    for sub in subfolders:
        folder = os.path.realpath(os.path.join(root, sub))
        if os.path.isdir(folder) and folder not in found:
            found.append(folder)
    return found


def is_inside(folder: str, path: str) -> bool:
    """Whether real path ``path`` lies in real folder ``folder`` (shared with the embedding loader)."""
    try:
        return os.path.commonpath((folder, path)) == folder
    except ValueError:  # different drives (Windows), or absolute mixed with relative
        return False


def _walk(folder: str, extensions: Sequence[str]) -> list[str]:
    """Model names below ``folder``, following symlinked files and folders as ComfyUI does.

    A symlink may point anywhere (shared model folders are often made of them);
    each real folder is walked once, so a link loop ends. Broken links are skipped.
    """
    names, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for filename in filenames:
            full = os.path.join(dirpath, filename)
            if filename.lower().endswith(tuple(extensions)) and os.path.isfile(full):
                names.append(os.path.relpath(full, folder).replace(os.sep, "/"))
    return names


def _extensions(kind: str) -> tuple[str, ...]:
    return MODEL_EXTENSIONS + EXTRA_EXTENSIONS.get(kind, ())


def get_filename_list(kind: str, *, extensions: Sequence[str] | None = None) -> list[str]:
    """Sorted model names of ``kind`` (ComfyUI's ``folder_paths.get_filename_list``), with
    the kind's :data:`EXTRA_EXTENSIONS` (``.gguf`` text encoders) unless ``extensions`` is given."""
    comfy = comfy_folder_paths()
    if comfy is not None:
        comfy_kind = _comfy_kind(comfy, kind)
        names = set(comfy.get_filename_list(comfy_kind))
        for folder in _comfy_folders(comfy, comfy_kind) if extensions is None else ():
            names.update(_walk(folder, EXTRA_EXTENSIONS.get(kind, ())))
        return sorted(names)
    names = set()
    for folder in kind_folders(kind):
        names.update(_walk(folder, _extensions(kind) if extensions is None else extensions))
    return sorted(names)


def _comfy_folders(comfy: ModuleType, comfy_kind: str) -> list[str]:
    """ComfyUI's existing folders of ``comfy_kind`` (real paths), for the extra extensions."""
    try:
        folders = comfy.get_folder_paths(comfy_kind)
    except (KeyError, AttributeError):
        return []
    return [os.path.realpath(folder) for folder in folders if os.path.isdir(folder)]


def _comfy_kind(comfy: ModuleType, kind: str) -> str:
    _check_kind(kind)
    if kind in ("clip", "text_encoders"):
        known = getattr(comfy, "folder_names_and_paths", {})
        return "text_encoders" if "text_encoders" in known or not known else "clip"
    return kind


def _resolve(kind: str, name: str) -> str:
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{kind} model name must be a non-empty string, got {name!r}")
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise CheckpointError(f"{kind} model name {name!r} must be relative to the {kind} folder")
    if ".." in name.replace("\\", "/").split("/"):
        raise CheckpointError(f"{kind} model name {name!r} climbs out of the {kind} folder ('..'); "
                              "pass a name as the folder lists it")
    folders = kind_folders(kind)
    if not folders:
        raise CheckpointError(f"no {kind} folder: set {ENV_VAR} or call textenc.loading.paths.set_models_dir() "
                              f"to a directory with a {'/'.join(KINDS[kind])} subfolder")
    for folder in folders:
        if name in _walk(folder, _extensions(kind)):  # listed: the file a symlink points to is read
            return os.path.realpath(os.path.join(folder, name))
    raise CheckpointError(f"{kind} model {name!r} not found in {', '.join(folders)} "
                          "(only model files the folder lists can be loaded)")


def get_full_path(kind: str, name: str) -> str:
    """The real path of model ``name`` of ``kind`` (ComfyUI's ``get_full_path_or_raise``).

    Raises:
        CheckpointError: unknown kind, no folder configured, a name escaping
            its folder, or a file that does not exist.
    """
    comfy = comfy_folder_paths()
    if comfy is None:
        return _resolve(kind, name)
    comfy_kind = _comfy_kind(comfy, kind)
    path = comfy.get_full_path(comfy_kind, name)
    if path is None or not os.path.isfile(path):
        raise CheckpointError(f"{kind} model {name!r} not found in ComfyUI's {comfy_kind} folders")
    return path


def embedding_directories() -> list[str]:
    """Textual-inversion folders: ComfyUI's ``embeddings`` paths, or ours."""
    comfy = comfy_folder_paths()
    if comfy is not None:
        return list(comfy.get_folder_paths("embeddings"))
    return kind_folders("embeddings")
