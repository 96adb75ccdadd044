"""One loader for "a model" as users name it: checkpoint files or a diffusers folder.

Every command-line ``--model`` goes through :func:`load_text_model`, so they
all accept the same things: full checkpoints and standalone text-encoder files
(CLIP, T5, UMT5) in any known key layout (:func:`textenc.sd.load_clip`),
and diffusers model folders (:func:`textenc.diffusers.load.load_from_diffusers`,
which reads the head count and activation from the folder's ``config.json``).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .errors import CheckpointError
from .loading.model_path import check_model_path, shown_path as _shown
from .sd import CLIP, load_clip

__all__ = ["load_text_model", "check_model_path"]


def load_text_model(model: str | os.PathLike | Sequence[str | os.PathLike], *,
                    clip_type: str | None = None, embedding_directory=None,
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> CLIP:
    """A :class:`~textenc.sd.CLIP` from checkpoint file(s) or one diffusers model folder.

    Args:
        model: one path, or several checkpoint files (SDXL: clip_l and clip_g; SD3: any of
            clip_l, clip_g, t5xxl; Flux: clip_l and t5xxl). A folder is read as a diffusers
            pipeline folder and must come alone.
        clip_type: a family (:data:`textenc.text_encoders.names.CLIP_TYPES`: ``"sd1"``, ...,
            ``"sd3"``, ``"flux"``, ``"wan"``; the meaning of ``--clip-type`` and of the node
            loaders' ``type``); None or ``"auto"`` detects it.
        embedding_directory: textual-inversion folder for ``embedding:name``.

    Raises:
        CheckpointError: a missing path, a non-UTF-8 path, a folder given with
            other paths, or the wrong model type; what the loaders raise
            (``DiffusersLayoutError`` for a folder that is not SD1/SD2/SDXL).
    """
    paths = [model] if isinstance(model, (str, bytes, os.PathLike)) else list(model)
    if not paths:
        raise CheckpointError("no model given: pass a checkpoint file or a diffusers model folder")
    paths = [check_model_path(path) for path in paths]
    folders = [path for path in paths if os.path.isdir(path)]
    if not folders:
        return load_clip(paths, embedding_directory=embedding_directory, clip_type=clip_type,
                         device=device, dtype=dtype)
    if len(paths) > 1:
        raise CheckpointError(f"{_shown(folders[0])} is a diffusers model folder, which holds every text "
                              "encoder; pass it alone")
    from .diffusers.load import load_from_diffusers

    clip = load_from_diffusers(paths[0], device=device, dtype=dtype, embedding_directory=embedding_directory)
    if clip_type not in (None, "auto") and clip.clip_type != clip_type:
        raise CheckpointError(f"clip type {clip_type!r} was asked for, but {_shown(paths[0])} holds "
                              f"a {clip.clip_type} model")
    return clip
