"""The depth of each text encoder of a model, read without loading any weight (issue 28).

So that a ``--clip-skip`` beyond the model's depth is refused before a load of several
seconds: a safetensors file's header gives its keys and shapes (the CLIP text encoders
are found by :func:`textenc.loading.detect.detect_text_encoders` on shape-only "meta"
tensors, T5 / UMT5 by their ``encoder.block.{i}.layer.`` keys), a diffusers folder's
``text_encoder*/config.json`` gives ``num_hidden_layers`` (CLIP) or ``num_layers`` (T5).

Anything else (a ``.ckpt`` pickle, GGUF, a file that does not parse) gives None: the
loader reads it and says what is wrong, and checks the depth itself once loaded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch

from ..errors import TextencError
from .checkpoint import read_safetensors_header
from .detect import detect_text_encoders

__all__ = ["text_encoder_depths"]

_T5_BLOCK = re.compile(r"^(.*?)encoder\.block\.(\d+)\.layer\.")
_DIFFUSERS_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def text_encoder_depths(paths: Sequence[str | os.PathLike]) -> list[int] | None:
    """The depth of every text encoder (CLIP, T5, UMT5) in the model ``paths`` (checkpoint
    files, or one diffusers folder); None when a path cannot be read so.

    Reads headers and ``config.json`` files only, never outside the given folder, and raises
    nothing: a path the loader will refuse gives None.
    """
    found: list[int] = []
    for path in map(Path, paths):
        try:
            depths = _folder_depths(path) if path.is_dir() else _file_depths(path)
        except (TextencError, OSError, ValueError):
            return None
        if not depths:
            return None
        found += depths
    return found


def _file_depths(path: Path) -> list[int]:
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return []
    shapes = {entry.name: torch.empty(entry.shape, device="meta") for entry in read_safetensors_header(path)}
    found = [info.num_layers for info in detect_text_encoders(shapes)]
    blocks: dict[str, int] = {}
    for key in shapes:
        match = _T5_BLOCK.match(key)
        if match:
            blocks[match[1]] = max(blocks.get(match[1], 0), int(match[2]) + 1)
    return found + list(blocks.values())


def _folder_depths(folder: Path) -> list[int]:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    if not isinstance(index, dict):
        return []
    inside = folder.resolve()
    found = []
    for name in _DIFFUSERS_ENCODERS:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] is not None):
            continue
        config_path = (folder / name / "config.json").resolve()
        if inside not in config_path.parents:
            return []  # a component outside the folder: the loader says so
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            return []
        # CLIPTextModel(WithProjection): num_hidden_layers; T5EncoderModel, UMT5EncoderModel: num_layers
        depth = config.get("num_hidden_layers", config.get("num_layers"))
        if isinstance(depth, bool) or not isinstance(depth, int):
            return []
        found.append(depth)
    return found
