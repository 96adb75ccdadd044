"""Load the text encoders of a diffusers folder or pipeline object (SD1/SD2/SDXL, SD3, Flux, Wan).

Part of :mod:`textenc.diffusers` (import from there). Kind (documented in
README, "Using textenc with diffusers"): ``StableDiffusionXL*Pipeline`` → SDXL; any other
``StableDiffusion*Pipeline`` (not SD3) → SD2 when its text encoder's
``hidden_act`` is ``gelu`` (OpenCLIP ViT-H), else SD1 (OpenAI CLIP-L,
``quick_gelu``). Padding always follows the pipeline's own tokenizer ``pad_token``.
``StableDiffusion3*``, ``Flux*`` and ``Wan*`` pipelines are the ``sd3``, ``flux`` and ``wan``
families; their T5 / UMT5 encoders are read by :mod:`textenc.diffusers.t5`.

diffusers is never imported: a pipeline is read through its attributes, no
transformers model is run, and its weights are shared, not copied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..loading.checkpoint import load_state_dict
from ..nn.config import CLIPTextConfig, load_text_config
from ..nn.t5_config import T5Config
from ..loading.detect import convert_text_state_dict
from ..errors import ConfigError, DiffusersLayoutError, TextencError
from ..sd import CLIP, CLIP_TYPES, build_clip
from ..text_encoders.families import Family, families, get_family
from .t5 import copy_spiece_model, t5_config, t5_model_max_length, t5_tokenizer_arguments

__all__ = ["KINDS", "load_from_diffusers", "pipeline_kind", "diffusers_encoder_names"]

KINDS = CLIP_TYPES
# Weight files in the order diffusers' text encoders are looked up (full precision first).
WEIGHT_FILES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin",
                "pytorch_model.fp16.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# transformers' CLIPTextConfig defaults, used for keys a config.json leaves out
# (https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/configuration_clip.py).
HF_CLIP_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                         "projection_dim": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
                         "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                         "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 49406,
                         "eos_token_id": 49407}
_TEXT_MODEL_TYPES = ("clip_text_model", None)


@dataclasses.dataclass(frozen=True)
class _Encoder:
    """One text encoder of a pipeline, ready to build: HF-layout weights, config, tokenizer."""

    state_dict: dict
    config: CLIPTextConfig | T5Config
    tokenizer_path: str
    pad_token: int
    source: str
    tokenizer_arguments: Mapping[str, Any] | None = None  # T5 roles: their tokenizer's own arguments
    model_max_length: int | None = None  # T5 roles: the tokenizer's, compel's chunk length

    def tokenizer_kwargs(self, tokenizer_class: type | None = None) -> dict[str, Any]:
        """The role's tokenizer arguments for :func:`textenc.sd.build_clip`; a tokenizer class that
        reads compel (Flux's T5: ``compel_max_length``) gets the folder's ``model_max_length``."""
        if self.tokenizer_arguments is not None:
            arguments = dict(self.tokenizer_arguments)
            if self.model_max_length is not None and hasattr(tokenizer_class, "compel_max_length"):
                arguments["compel_max_length"] = self.model_max_length
            return arguments
        return {"tokenizer_path": self.tokenizer_path, "embedding_size": self.config.hidden_size,
                "pad_token": self.pad_token}


# ---- kind -----------------------------------------------------------------------

def _pipeline_families(class_name: Any) -> list[Family]:
    """The families whose ``<pipeline_prefix>*Pipeline`` names ``class_name`` (the longest
    prefix wins; SD1 and SD2 share theirs and are told apart by the text config)."""
    name = str(class_name)
    matches = [f for f in families() if f.pipeline_prefix and name.startswith(f.pipeline_prefix)
               and name.endswith("Pipeline") and not name[len(f.pipeline_prefix):][:1].isdigit()]
    longest = max((len(f.pipeline_prefix) for f in matches), default=0)
    found = [f for f in matches if len(f.pipeline_prefix) == longest]
    if not found:
        supported = ", ".join(f"{f.pipeline_prefix}*Pipeline" for f in families() if f.pipeline_prefix)
        raise DiffusersLayoutError(f"{name!r} is not a pipeline textenc knows the text encoders of; "
                                   f"textenc supports {supported}")
    return found


def pipeline_kind(class_name: str, text_config: CLIPTextConfig | None = None) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from a pipeline class name and its text config.

    Families that share a pipeline prefix are told apart by their first role's
    activation (SD2's ViT-H: ``gelu``; otherwise the first registered, SD1).

    Raises:
        DiffusersLayoutError: not a Stable Diffusion 1/2/XL pipeline.

    >>> pipeline_kind("StableDiffusionXLInpaintPipeline")
    'sdxl'
    """
    found = _pipeline_families(class_name)
    if len(found) == 1:
        return found[0].name
    if text_config is None:
        raise DiffusersLayoutError(f"{class_name}: the text encoder config is needed to tell "
                                   + " from ".join(f.label for f in found))
    return next((f.name for f in found if f.roles[0].activation == text_config.hidden_act), found[0].name)


def _components(class_name: Any) -> list[tuple[str, str, bool]]:
    """``(text encoder, tokenizer, is T5)`` attribute names of the pipeline's roles, in role order."""
    return [(role.diffusers_text_encoder, role.diffusers_tokenizer, role.min_length is not None)
            for role in _pipeline_families(class_name)[0].roles]


def diffusers_encoder_names() -> tuple[str, ...]:
    """Every pipeline attribute a registered family's text encoder sits in (``text_encoder``,
    ``text_encoder_2``), in order."""
    names = [role.diffusers_text_encoder for family in families() for role in family.roles]
    return tuple(dict.fromkeys(names))


# ---- folder reading -----------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DiffusersLayoutError(f"{path}: missing; {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffusersLayoutError(f"{path}: not readable JSON ({exc}); re-download the file") from exc
    if not isinstance(data, dict):
        raise DiffusersLayoutError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _component(folder: Path, index: Mapping, name: str) -> Path:
    """The sub-folder of component ``name``, which ``model_index.json`` must list."""
    entry = index.get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        raise DiffusersLayoutError(f"{folder / 'model_index.json'}: no {name!r} component "
                                   f"({index.get('_class_name')!r} needs one); is this a UNet-only "
                                   "folder or an SDXL refiner? Pass the full pipeline folder")
    path = folder / name
    if not path.is_dir():
        raise DiffusersLayoutError(f"{path}: missing, but model_index.json lists {name!r}; "
                                   "the download is incomplete")
    return path


def _shard_files(index_path: Path) -> list[Path]:
    weight_map = _read_json(index_path, "shard index").get("weight_map")
    names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    if not names or any(not isinstance(n, str) or not n or Path(n).name != n for n in names):
        raise DiffusersLayoutError(f"{index_path}: weight_map must name shard files in this folder")
    return [index_path.parent / n for n in names]


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Weights-only loading of the first weight file found (or of every shard)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return load_state_dict(folder / name)
    for name in SHARD_INDEXES:
        if (folder / name).is_file():
            merged: dict[str, torch.Tensor] = {}
            for shard in _shard_files(folder / name):
                merged.update(load_state_dict(shard))
            return merged
    raise DiffusersLayoutError(f"{folder}: no weights; expected one of "
                               f"{WEIGHT_FILES + SHARD_INDEXES}")


def _text_config(hf_config: Mapping[str, Any], *, has_projection: bool, source: str) -> CLIPTextConfig:
    """textenc's config from a transformers ``CLIPTextConfig`` dict (heads, activation included)."""
    model_type = hf_config.get("model_type")
    if model_type not in _TEXT_MODEL_TYPES:
        raise DiffusersLayoutError(f"{source}: model_type {model_type!r} is not a CLIP text model")
    data = {key: hf_config.get(key, default) for key, default in HF_CLIP_TEXT_DEFAULTS.items()}
    if not has_projection:
        # CLIPTextModel has no projection (SD1, SD2, SDXL's first encoder): the pooled
        # output is unprojected, whatever projection_dim the config carries (SD2 says 512).
        data["projection_dim"] = data["hidden_size"]
    try:
        return load_text_config(data)
    except ConfigError as exc:
        raise DiffusersLayoutError(f"{source}: {exc}") from exc


def _pad_token_id(folder: Path) -> int:
    """The id of the tokenizer's ``pad_token`` (default ``<|endoftext|>``, as CLIPTokenizer)."""
    pad = "<|endoftext|>"
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            value = _read_json(folder / name, "").get("pad_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                pad = value
                break
    path = folder / "vocab.json"
    if not path.is_file():
        path = folder / "tokenizer.json"
    data = _read_json(path, "expected vocab.json + merges.txt or tokenizer.json")
    try:
        if path.name == "vocab.json":
            vocab = data
        else:
            vocab = dict((data.get("model") or {}).get("vocab") or {})
            vocab.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
        pad_id = int(vocab[pad]) if pad in vocab else None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a hand-edited or foreign file
        raise DiffusersLayoutError(f"{path}: malformed tokenizer file ({type(exc).__name__}: {exc})") from exc
    if pad_id is None:
        raise DiffusersLayoutError(f"{folder}: pad_token {pad!r} is not in the vocabulary")
    return pad_id


def _t5_encoder(raw: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any], tokenizer: Path,
                source: str) -> _Encoder:
    config = t5_config(hf_config, source=f"{source}/config.json")
    return _Encoder(dict(raw), config, str(tokenizer), 0, source, t5_tokenizer_arguments(tokenizer, config),
                    t5_model_max_length(tokenizer))


def _folder_encoder(folder: Path, tokenizer: Path, is_t5: bool = False) -> _Encoder:
    """Read one ``text_encoder*`` folder and its matching ``tokenizer*`` folder."""
    hf_config = _read_json(folder / "config.json", "the text encoder needs its config.json")
    raw = _load_weights(folder)
    if is_t5:
        return _t5_encoder(raw, hf_config, tokenizer, str(folder))
    converted = convert_text_state_dict(raw, source=str(folder)).state_dict
    config = _text_config(hf_config, has_projection="text_projection.weight" in converted,
                          source=str(folder / "config.json"))
    return _Encoder(converted, config, str(tokenizer), _pad_token_id(tokenizer), str(folder))


def _listed(index: Mapping, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _from_folder(folder: Path) -> tuple[str, list[_Encoder | None]]:
    index = _read_json(folder / "model_index.json", "not a diffusers pipeline folder "
                       "(pass the folder holding model_index.json)")
    class_name = index.get("_class_name")
    partial = _pipeline_families(class_name)[0].partial
    encoders = [None if partial and not _listed(index, encoder_name) else
                _folder_encoder(_component(folder, index, encoder_name), _component(folder, index, tokenizer_name),
                                is_t5)
                for encoder_name, tokenizer_name, is_t5 in _components(class_name)]
    return _kind(class_name, encoders), encoders


def _kind(class_name: Any, encoders: Sequence[_Encoder | None]) -> str:
    first = next(e for e in encoders if e is not None)
    return pipeline_kind(class_name, first.config if isinstance(first.config, CLIPTextConfig) else None)


# ---- pipeline objects ------------------------------------------------------------------

def _object_encoder(pipe: Any, encoder_name: str, tokenizer_name: str, tmp: str, is_t5: bool = False
                    ) -> _Encoder | None:
    module, tokenizer = getattr(pipe, encoder_name, None), getattr(pipe, tokenizer_name, None)
    if module is None and _pipeline_families(type(pipe).__name__)[0].partial:
        return None  # SD3 runs without any one of its encoders, as ComfyUI
    if module is None or tokenizer is None:
        raise DiffusersLayoutError(f"{type(pipe).__name__} has no {encoder_name}/{tokenizer_name}; "
                                   "textenc needs the pipeline's text encoder(s)")
    if is_t5:
        path = os.path.join(tmp, tokenizer_name)
        tokenizer.save_pretrained(path)  # tokenizer.json, and spiece.model where it has one
        copy_spiece_model(tokenizer, Path(path))
        return _t5_encoder(module.state_dict(), module.config.to_dict(), Path(path), f"pipe.{encoder_name}")
    # transformers 5 keeps CLIPTextModel's keys flat (no "text_model."); both layouts convert.
    converted = convert_text_state_dict(module.state_dict(), source=f"pipe.{encoder_name}").state_dict
    config = _text_config(module.config.to_dict(), source=f"pipe.{encoder_name}.config",
                          has_projection="text_projection.weight" in converted)
    path = os.path.join(tmp, tokenizer_name)
    tokenizer.save_pretrained(path)  # tokenizer.json; read once, at construction
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return _Encoder(converted, config, path, int(pad), f"pipe.{encoder_name}")


def _from_pipeline(pipe: Any, tmp: str) -> tuple[str, list[_Encoder | None]]:
    class_name = type(pipe).__name__
    encoders = [_object_encoder(pipe, e, t, tmp, is_t5) for e, t, is_t5 in _components(class_name)]
    if all(e is None for e in encoders):
        raise DiffusersLayoutError(f"{class_name} has no text encoder at all")
    return _kind(class_name, encoders), encoders


# ---- building ------------------------------------------------------------------------

def _model_kwargs(kind: str, encoders: Sequence[_Encoder | None], joint_width: int | None) -> dict[str, Any]:
    """SD3 without ``text_encoder_3``: its CLIP rows are padded to the transformer's width (the
    pipeline's own ``_get_t5_prompt_embeds`` gives zeros ``joint_attention_dim`` wide then)."""
    family = get_family(kind)
    t5_missing = any(role.is_t5 and e is None for role, e in zip(family.roles, encoders))
    return {"width_without_t5": joint_width} if family.partial and t5_missing and joint_width else {}


def _folder_joint_width(folder: Path) -> int | None:
    """``joint_attention_dim`` of the folder's ``transformer/config.json``; None without one."""
    path = folder / "transformer" / "config.json"
    value = _read_json(path, "").get("joint_attention_dim") if path.is_file() else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _pipeline_joint_width(pipe: Any) -> int | None:
    """``pipe.transformer.config.joint_attention_dim``; None without a transformer."""
    value = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "joint_attention_dim", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _build(kind: str, encoders: Sequence[_Encoder | None], *, device: Any, dtype: torch.dtype | None,
           embedding_directory: Any, joint_width: int | None = None) -> CLIP:
    family = get_family(kind)
    by_role = {role: e for role, e in zip(family.role_names, encoders) if e is not None}
    try:
        clip = build_clip(
            kind, {role: e.state_dict for role, e in by_role.items()},
            {role: e.config for role, e in by_role.items()},
            {role: e.tokenizer_kwargs(family.role(role).tokenizer_class) for role, e in by_role.items()},
            sources={role: e.source for role, e in by_role.items()},
            embedding_directory=embedding_directory, device=device, dtype=dtype,
            model_kwargs=_model_kwargs(kind, encoders, joint_width))
    except DiffusersLayoutError:
        raise
    except TextencError as exc:  # weights that do not fit the folder's config.json
        raise DiffusersLayoutError(str(exc)) from exc
    return clip


def load_from_diffusers(path_or_pipeline: str | os.PathLike | Any, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", embedding_directory: Any = None) -> CLIP:
    """Build a textenc :class:`~textenc.sd.CLIP` from a diffusers folder or pipeline (SD1/SD2/SDXL,
    SD3 with ``text_encoder_3`` (T5; any encoder may be missing), Flux (``text_encoder_2``: T5),
    Wan (``text_encoder``: UMT5, its ``tokenizer/spiece.model``)).

    Args:
        path_or_pipeline: a folder with ``model_index.json``, ``text_encoder/``
            (``config.json`` + ``model.safetensors``, ``model.fp16.safetensors``,
            ``pytorch_model.bin`` or shards) and ``tokenizer/`` (``vocab.json`` +
            ``merges.txt``, or ``tokenizer.json``), plus the ``_2`` pair for SDXL;
            or a loaded pipeline object.
        dtype: weight storage dtype; None keeps the file's (or the pipeline's).
        device: where the text encoder lives.
        embedding_directory: textual-inversion folder(s) for ``embedding:name``.

    Returns:
        A CLIP with ``clip_type`` ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sd3"``, ``"flux"`` or ``"wan"``. An SD2 text
        encoder of 23 layers (ViT-H without its last, as diffusers' SD2 folders
        ship it) is numbered as ViT-H's 24 layers, as ComfyUI does: its default
        ``-2`` is the folder's last layer (see :mod:`textenc.text_encoders.sd2_clip`).

    Raises:
        DiffusersLayoutError: missing ``model_index.json``/component/config,
            unsupported pipeline class, weights that do not fit the config.
        CheckpointError: an unreadable or truncated weight file (from the loader).
    """
    if isinstance(path_or_pipeline, (str, os.PathLike)):
        folder = Path(path_or_pipeline)
        if not folder.is_dir():
            raise DiffusersLayoutError(f"{folder}: not a folder; pass a diffusers pipeline folder")
        kind, encoders = _from_folder(folder)
        return _build(kind, encoders, device=device, dtype=dtype, embedding_directory=embedding_directory,
                      joint_width=_folder_joint_width(folder))
    # A pipeline's tokenizers are saved to files for ours to read once, at construction.
    with tempfile.TemporaryDirectory(prefix="textenc-tokenizer-") as tmp:
        kind, encoders = _from_pipeline(path_or_pipeline, tmp)
        return _build(kind, encoders, device=device, dtype=dtype, embedding_directory=embedding_directory,
                      joint_width=_pipeline_joint_width(path_or_pipeline))
