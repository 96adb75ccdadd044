"""The model of a dataset run: device choice, loading and the weights' fingerprint.

Shared by the driver (:mod:`textenc.dataset.driver`) and the Ray actors
(:mod:`textenc.dataset.engines.ray`), which load the model themselves.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import torch

from ..diffusers.load import load_from_diffusers
from ..errors import DatasetError
from ..loading.embeddings import EXTENSIONS as EMBEDDING_EXTENSIONS
from ..sd import load_clip
from .compute import torch_dtype
from .format import tensor_bytes

__all__ = ["resolve_device", "load_model", "model_fingerprint", "embeddings_fingerprint", "cast_for_compute"]


def resolve_device(device: str | None) -> str:
    """``None``/``"auto"`` → ``"cuda"`` when available, else ``"cpu"``; other values unchanged."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(model: str | os.PathLike | Sequence[str | os.PathLike], *, kind: str | None, device: str,
               embeddings: str | None = None):
    """A :class:`textenc.sd.CLIP` from a checkpoint file, several text-encoder files (Flux:
    clip_l and t5xxl) or a diffusers model folder; ``kind`` is the asked-for clip type
    (None: detected), ``embeddings`` the textual-inversion folder."""
    paths = [os.fspath(model)] if isinstance(model, (str, os.PathLike)) else [os.fspath(p) for p in model]
    for path in paths:
        if not os.path.exists(path):
            raise DatasetError(f"--model {path}: no such file or folder")
    if len(paths) == 1 and os.path.isdir(paths[0]):
        clip = load_from_diffusers(paths[0], device=device, embedding_directory=embeddings)
        if kind is not None and clip.clip_type != kind:
            raise DatasetError(f"--clip-type {kind} was asked for, but {paths[0]} is a {clip.clip_type} model")
        return clip
    if any(os.path.isdir(path) for path in paths):
        raise DatasetError(f"--model: a diffusers model folder holds every text encoder; pass it alone, "
                           f"got {paths}")
    return load_clip(paths if len(paths) > 1 else paths[0], embedding_directory=embeddings, clip_type=kind,
                     device=device)


def model_fingerprint(clip) -> str:
    """sha256 over the text encoders' weights (names, dtypes, shapes, bytes)."""
    hasher = hashlib.sha256()
    state = clip.cond_stage_model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        hasher.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        hasher.update(tensor_bytes(tensor))
    return "sha256:" + hasher.hexdigest()


def embeddings_fingerprint(folder: str | None) -> dict | None:
    """The manifest's record of a textual-inversion folder: its path and a sha256 over the
    relative name and bytes of every embedding file in it (so a changed, added or removed
    embedding is a different encoding); None without a folder. Links leaving the folder
    are skipped, as the embedding loader skips them."""
    if folder is None:
        return None
    root = os.path.realpath(folder)
    hasher = hashlib.sha256()
    for base, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(base, name)
            inside = os.path.commonpath([root, os.path.realpath(path)]) == root
            if inside and name.lower().endswith(EMBEDDING_EXTENSIONS) and os.path.isfile(path):
                hasher.update(os.path.relpath(path, root).encode("utf-8", "surrogateescape") + b"\0")
                hasher.update(hashlib.sha256(_read(path)).digest())
    return {"folder": folder, "sha256": "sha256:" + hasher.hexdigest()}


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def cast_for_compute(clip, compute_dtype: str) -> None:
    """Store the text encoders' weights in the compute dtype, once, after fingerprinting.

    The same bytes as casting them in every forward (``ops.manual_cast`` does
    that for a file stored in another dtype), without the per-forward cost.
    """
    dtype = torch_dtype(compute_dtype)
    model = clip.cond_stage_model
    model.to(dtype)
    for module in model.modules():
        if hasattr(module, "storage_dtype"):
            module.storage_dtype = dtype
        if hasattr(module, "clear_caches"):
            module.clear_caches()
