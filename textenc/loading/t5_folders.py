"""Read a diffusers / transformers ``T5EncoderModel`` folder, sharded or not, safely.

Flux keeps its T5 in ``text_encoder_2/`` and SD3 in ``text_encoder_3/``: a ``config.json``
and ``model.safetensors`` or shards listed by ``model.safetensors.index.json``. A shard
index is data from the internet: every file it names must be a plain name inside the
folder (``../x.safetensors``, absolute paths and links leading out are refused), and no
key may come from two shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from textenc.errors import CheckpointError
from textenc.loading.checkpoint import load_state_dict

__all__ = ["read_t5_folder", "find_t5_folder"]

_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_T5_CLASSES = ("T5EncoderModel", "UMT5EncoderModel", "T5ForConditionalGeneration", "UMT5ForConditionalGeneration")
#: Pipeline components that hold a T5, in the order they are tried (SD3's, Flux's, Wan's).
_COMPONENTS = ("text_encoder_3", "text_encoder_2", "text_encoder")
_MAX_JSON_BYTES = 16 * 1024 * 1024
#: Config names checked against the shapes read from the weights.
_CONFIG_KEYS = ("d_model", "d_ff", "num_heads", "d_kv", "num_layers", "vocab_size")


def find_t5_folder(folder: Path) -> Path:
    """``folder`` itself, or its T5 component when ``folder`` is a pipeline (``model_index.json``)."""
    if not (folder / "model_index.json").is_file():
        return folder
    for name in _COMPONENTS:
        config = folder / name / "config.json"
        if config.is_file() and set(_read_json(config).get("architectures") or ()) & set(_T5_CLASSES):
            return folder / name
    raise CheckpointError(f"{folder}: a diffusers pipeline without a T5 text encoder "
                          f"(looked in {list(_COMPONENTS)}); pass the T5 encoder's folder or file")


def read_t5_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All weights of a T5 folder (memory-mapped), merged over its shards.

    Raises:
        CheckpointError: no weights file, a shard index naming files outside the folder,
            a key in two shards, a shard missing a key the index promises.
    """
    folder = find_t5_folder(folder)
    index = next((folder / name for name in _INDEXES if (folder / name).is_file()), None)
    if index is None:
        single = next((folder / name for name in _SINGLE_FILES if (folder / name).is_file()), None)
        if single is None:
            raise CheckpointError(f"{folder}: no {list(_SINGLE_FILES)} or shard index {list(_INDEXES)}; "
                                  "pass a T5EncoderModel folder or a weights file")
        return load_state_dict(single)
    weight_map = _weight_map(index)
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        for key, tensor in load_state_dict(_inside(folder, shard, index)).items():
            if key in merged:
                raise CheckpointError(f"{index}: key {key!r} is in more than one shard; the folder is malformed")
            merged[key] = tensor
    absent = [k for k in weight_map if k not in merged]
    if absent:
        raise CheckpointError(f"{index}: {len(absent)} key(s) the index lists are in no shard "
                              f"({absent[:4]}); a shard is truncated or from another model")
    return merged


def _weight_map(index: Path) -> dict[str, str]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def _inside(folder: Path, name: str, index: Path) -> Path:
    """The shard ``name``, refused unless it is a file directly inside ``folder``."""
    candidate = folder / name
    if Path(name).name != name or name in ("", ".", "..") or \
            candidate.resolve().parent != folder.resolve():
        raise CheckpointError(f"{index}: shard {name!r} is not a file name inside {folder}; "
                              "textenc never reads outside the folder it is given")
    return candidate


def _read_json(path: Path) -> dict:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes is too large for a config or index")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def check_folder_config(folder: Path, shapes: dict[str, int]) -> None:
    """Refuse a ``config.json`` whose sizes disagree with the weights' shapes."""
    config_path = find_t5_folder(folder) / "config.json"
    if not config_path.is_file():
        return
    config = _read_json(config_path)
    wrong = {k: (config[k], shapes[k]) for k in _CONFIG_KEYS if k in config and config[k] != shapes[k]}
    if wrong:
        raise CheckpointError(f"{config_path}: config disagrees with the weights (config, weights): {wrong}; "
                              "the folder mixes two models")
