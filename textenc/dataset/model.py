"""The model of a dataset run: device choice, loading and the weights' fingerprint.

Shared by the driver (:mod:`textenc.dataset.driver`) and the Ray actors
(:mod:`textenc.dataset.engines.ray`), which load the model themselves.
"""

from __future__ import annotations

import hashlib
import os

import torch

from ..diffusers.load import load_from_diffusers
from ..errors import DatasetError
from ..sd import load_clip
from .compute import torch_dtype
from .format import tensor_bytes

__all__ = ["resolve_device", "load_model", "model_fingerprint", "cast_for_compute"]


def resolve_device(device: str | None) -> str:
    """``None``/``"auto"`` → ``"cuda"`` when available, else ``"cpu"``; other values unchanged."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(model: str | os.PathLike, *, kind: str | None, device: str):
    """A :class:`textenc.sd.CLIP` from a checkpoint file or a diffusers model folder."""
    path = os.fspath(model)
    if not os.path.exists(path):
        raise DatasetError(f"--model {path}: no such file or folder")
    if os.path.isdir(path):
        clip = load_from_diffusers(path, device=device)
        if kind is not None and clip.clip_type != kind:
            raise DatasetError(f"--kind {kind} was asked for, but {path} is a {clip.clip_type} model")
        return clip
    return load_clip(path, clip_type=kind, device=device)


def model_fingerprint(clip) -> str:
    """sha256 over the text encoders' weights (names, dtypes, shapes, bytes)."""
    hasher = hashlib.sha256()
    state = clip.cond_stage_model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        hasher.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        hasher.update(tensor_bytes(tensor))
    return "sha256:" + hasher.hexdigest()


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
