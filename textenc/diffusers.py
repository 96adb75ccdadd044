"""Stable Diffusion pipelines from diffusers: their text encoders as a textenc ``CLIP``,
and ComfyUI-style conditioning handed back as the pipeline's keyword arguments.

>>> # pipe = StableDiffusionPipeline.from_pretrained("some/sd15-folder")
>>> # kwargs = encode_for_pipeline(pipe, "a (red fox:1.2) in the snow", "blurry")
>>> # image = pipe(**kwargs, num_inference_steps=30).images[0]

Kind (documented in docs/diffusers.md): ``StableDiffusionXL*Pipeline`` → SDXL;
any other ``StableDiffusion*Pipeline`` (not SD3) → SD2 when its text encoder's
``hidden_act`` is ``gelu`` (OpenCLIP ViT-H), else SD1 (OpenAI CLIP-L, ``quick_gelu``).
Padding always follows the pipeline's own tokenizer ``pad_token``.

diffusers is never imported: a pipeline is read through its attributes, no
transformers model is run, and its weights are shared, not copied.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .checkpoint import load_state_dict
from .conditioning import validate_conditioning
from .config import CLIPTextConfig, load_text_config
from .detect import convert_text_state_dict
from .errors import ConfigError, DiffusersLayoutError, PromptError, TextencError
from .sd import CLIP
from .sd1_clip import SD1ClipModel, SD1Tokenizer
from .sd1_encode import empty_encoding
from .sd2_clip import SD2ClipModel, SD2Tokenizer
from .sdxl_clip import SDXLClipModel, SDXLTokenizer

__all__ = ["KINDS", "load_from_diffusers", "encode_for_pipeline", "to_diffusers", "pipeline_kind"]

KINDS = ("sd1", "sd2", "sdxl")
CACHE_ATTRIBUTE = "_textenc_clip"
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
    config: CLIPTextConfig
    tokenizer_path: str
    pad_token: int
    source: str


# ---- kind -----------------------------------------------------------------------

def _family(class_name: Any) -> str:
    """``"sdxl"`` or ``"sd"`` (SD1/SD2, told apart by the config) from a pipeline class name."""
    name = str(class_name)
    if name.startswith("StableDiffusionXL") and name.endswith("Pipeline"):
        return "sdxl"
    rest = name[len("StableDiffusion"):]
    if name.startswith("StableDiffusion") and name.endswith("Pipeline") and not rest[:1].isdigit():
        return "sd"
    raise DiffusersLayoutError(f"{name!r} is not a Stable Diffusion 1.x/2.x/XL pipeline; textenc "
                               "supports StableDiffusion*Pipeline and StableDiffusionXL*Pipeline "
                               "(StableDiffusion3, Flux, ... have other text encoders)")


def pipeline_kind(class_name: str, text_config: CLIPTextConfig | None = None) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from a pipeline class name and its text config.

    Raises:
        DiffusersLayoutError: not a Stable Diffusion 1/2/XL pipeline.

    >>> pipeline_kind("StableDiffusionXLInpaintPipeline")
    'sdxl'
    """
    if _family(class_name) == "sdxl":
        return "sdxl"
    if text_config is None:
        raise DiffusersLayoutError(f"{class_name}: the text encoder config is needed to tell SD1 from SD2")
    return "sd2" if text_config.hidden_act == "gelu" else "sd1"


_COMPONENTS = {"sd": [("text_encoder", "tokenizer")],
               "sdxl": [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]}


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
    data = _read_json(index_path, "shard index")
    names = sorted(set((data.get("weight_map") or {}).values()))
    if not names or any(Path(n).name != n or not str(n) for n in names):
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
    if (folder / "vocab.json").is_file():
        vocab = _read_json(folder / "vocab.json", "")
    else:
        data = _read_json(folder / "tokenizer.json", "expected vocab.json + merges.txt or tokenizer.json")
        vocab = dict((data.get("model") or {}).get("vocab") or {})
        vocab.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
    if pad not in vocab:
        raise DiffusersLayoutError(f"{folder}: pad_token {pad!r} is not in the vocabulary")
    return int(vocab[pad])


def _folder_encoder(folder: Path, weights_source: str | None = None) -> _Encoder:
    """Read one ``text_encoder*`` folder (its matching tokenizer folder is passed separately)."""
    hf_config = _read_json(folder / "config.json", "the text encoder needs its config.json")
    raw = _load_weights(folder)
    converted = convert_text_state_dict(raw, source=weights_source or str(folder)).state_dict
    config = _text_config(hf_config, has_projection="text_projection.weight" in converted,
                          source=str(folder / "config.json"))
    return _Encoder(converted, config, "", 0, str(folder))


def _from_folder(folder: Path) -> tuple[str, list[_Encoder]]:
    index = _read_json(folder / "model_index.json", "not a diffusers pipeline folder "
                       "(pass the folder holding model_index.json)")
    encoders = []
    for encoder_name, tokenizer_name in _COMPONENTS[_family(index.get("_class_name"))]:
        encoder = _folder_encoder(_component(folder, index, encoder_name))
        tokenizer = _component(folder, index, tokenizer_name)
        encoders.append(dataclasses.replace(encoder, tokenizer_path=str(tokenizer),
                                            pad_token=_pad_token_id(tokenizer)))
    return pipeline_kind(index.get("_class_name"), encoders[0].config), encoders


# ---- pipeline objects ------------------------------------------------------------------

def _object_encoder(pipe: Any, encoder_name: str, tokenizer_name: str, tmp: str) -> _Encoder:
    module, tokenizer = getattr(pipe, encoder_name, None), getattr(pipe, tokenizer_name, None)
    if module is None or tokenizer is None:
        raise DiffusersLayoutError(f"{type(pipe).__name__} has no {encoder_name}/{tokenizer_name}; "
                                   "textenc needs the pipeline's CLIP text encoder(s)")
    # transformers 5 keeps CLIPTextModel's keys flat (no "text_model."); both layouts convert.
    converted = convert_text_state_dict(module.state_dict(), source=f"pipe.{encoder_name}").state_dict
    config = _text_config(module.config.to_dict(), source=f"pipe.{encoder_name}.config",
                          has_projection="text_projection.weight" in converted)
    path = os.path.join(tmp, tokenizer_name)
    tokenizer.save_pretrained(path)  # tokenizer.json; read once, at construction
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return _Encoder(converted, config, path, int(pad), f"pipe.{encoder_name}")


def _from_pipeline(pipe: Any, tmp: str) -> tuple[str, list[_Encoder]]:
    class_name = type(pipe).__name__
    encoders = [_object_encoder(pipe, e, t, tmp) for e, t in _COMPONENTS[_family(class_name)]]
    return pipeline_kind(class_name, encoders[0].config), encoders


# ---- building ------------------------------------------------------------------------

def _tokenizer_kwargs(encoder: _Encoder) -> dict[str, Any]:
    return {"tokenizer_path": encoder.tokenizer_path, "embedding_size": encoder.config.hidden_size,
            "pad_token": encoder.pad_token}


def _match_special_tokens(model: torch.nn.Module, tokenizer: Any) -> None:
    """Give the model the tokenizer's start/end/pad ids (they make the empty prompt)."""
    model.special_tokens = {"start": tokenizer.start_token, "end": tokenizer.end_token,
                            "pad": tokenizer.pad_token}


def _build(kind: str, encoders: Sequence[_Encoder], *, device: Any, dtype: torch.dtype | None,
           embedding_directory: Any) -> CLIP:
    first = encoders[0]
    if kind == "sdxl":
        second = encoders[1]
        model = SDXLClipModel(device=device, dtype=dtype, l_config=first.config, g_config=second.config)
        tokenizer = SDXLTokenizer(embedding_directory=embedding_directory,
                                  l_kwargs=_tokenizer_kwargs(first), g_kwargs=_tokenizer_kwargs(second))
        pairs = [(model.clip_l, tokenizer.clip_l, first), (model.clip_g, tokenizer.clip_g, second)]
    else:
        model_class, tokenizer_class = (SD1ClipModel, SD1Tokenizer) if kind == "sd1" else (SD2ClipModel, SD2Tokenizer)
        model = model_class(device=device, dtype=dtype, textmodel_json_config=first.config)
        tokenizer = tokenizer_class(embedding_directory=embedding_directory, **_tokenizer_kwargs(first))
        pairs = [(model.encoder, tokenizer.tokenizer, first)]
    for encoder_model, encoder_tokenizer, encoder in pairs:
        _match_special_tokens(encoder_model, encoder_tokenizer)
        try:
            encoder_model.load_sd(encoder.state_dict)
        except TextencError as exc:
            raise DiffusersLayoutError(f"{encoder.source}: {exc}") from exc
    return CLIP(model, tokenizer, clip_type=kind)


def load_from_diffusers(path_or_pipeline: str | os.PathLike | Any, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", embedding_directory: Any = None) -> CLIP:
    """Build a textenc :class:`~textenc.sd.CLIP` from a diffusers SD1/SD2/SDXL folder or pipeline.

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
        A CLIP with ``clip_type`` ``"sd1"``, ``"sd2"`` or ``"sdxl"``.

    Raises:
        DiffusersLayoutError: missing ``model_index.json``/component/config,
            unsupported pipeline class, weights that do not fit the config.
        CheckpointError: an unreadable or truncated weight file (from the loader).
    """
    with tempfile.TemporaryDirectory(prefix="textenc-tokenizer-") as tmp:
        if isinstance(path_or_pipeline, (str, os.PathLike)):
            folder = Path(path_or_pipeline)
            if not folder.is_dir():
                raise DiffusersLayoutError(f"{folder}: not a folder; pass a diffusers pipeline folder")
            kind, encoders = _from_folder(folder)
        else:
            kind, encoders = _from_pipeline(path_or_pipeline, tmp)
        return _build(kind, encoders, device=device, dtype=dtype, embedding_directory=embedding_directory)


# ---- encoding --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Target:
    clip: CLIP
    device: torch.device
    dtype: torch.dtype


def _module_dtype_device(module: Any) -> tuple[torch.dtype, torch.device]:
    parameter = next(module.parameters())
    return parameter.dtype, parameter.device


def _cached_clip(pipe: Any, embedding_directory: Any) -> CLIP:
    """The pipeline's CLIP, built once and kept on ``pipe._textenc_clip``.

    The cache is keyed by the text encoder objects (by identity), their dtype and
    device and the embedding directory; swapping or moving an encoder rebuilds it.
    """
    modules = tuple(getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2"))
    layout = tuple(_module_dtype_device(m) if m is not None else None for m in modules)
    key = (layout, repr(embedding_directory))
    cached = getattr(pipe, CACHE_ATTRIBUTE, None)
    if cached is not None and cached[1] == key and all(a is b for a, b in zip(cached[0], modules)):
        return cached[2]
    if modules[0] is None:
        raise DiffusersLayoutError(f"{type(pipe).__name__} has no text_encoder; textenc needs "
                                   "the pipeline's CLIP text encoder(s)")
    dtype, device = layout[0]
    clip = load_from_diffusers(pipe, dtype=dtype, device=device, embedding_directory=embedding_directory)
    setattr(pipe, CACHE_ATTRIBUTE, (modules, key, clip))
    return clip


def _target(pipe_or_loaded: Any, embedding_directory: Any, device: Any, dtype: Any) -> _Target:
    """The CLIP to encode with and the dtype/device the pipeline expects its inputs in."""
    if isinstance(pipe_or_loaded, CLIP):
        if embedding_directory is not None:
            raise TextencError("embedding_directory is for pipeline objects; pass it to "
                               "load_from_diffusers when loading a folder")
        model = pipe_or_loaded.cond_stage_model
        parameter = next(model.parameters())
        return _Target(pipe_or_loaded, torch.device(device or parameter.device),
                       dtype or parameter.dtype)
    clip = _cached_clip(pipe_or_loaded, embedding_directory)
    # diffusers casts prompt embeddings to text_encoder_2's dtype (SDXL) or text_encoder's.
    last = getattr(pipe_or_loaded, "text_encoder_2", None) or pipe_or_loaded.text_encoder
    pipe_device = getattr(pipe_or_loaded, "_execution_device", None) or _module_dtype_device(last)[1]
    return _Target(clip, torch.device(device or pipe_device), dtype or _module_dtype_device(last)[0])


def _prompt_list(prompt: str | Sequence[str], what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise PromptError(f"{what} must be a str or a non-empty list of str, got {prompt!r:.80}")
    return prompts


def _negative_list(negative: str | Sequence[str] | None, batch: int) -> list[str]:
    negatives = _prompt_list("" if negative is None else negative, "negative_prompt")
    if len(negatives) == 1:
        return negatives * batch
    if len(negatives) != batch:
        raise PromptError(f"negative_prompt has {len(negatives)} entries but prompt has {batch}; "
                          "pass one negative (broadcast) or one per prompt")
    return negatives


def _encode_options(clip_skip: int | None, weight_mode: str) -> dict[str, Any]:
    options: dict[str, Any] = {"weight_mode": weight_mode}
    if clip_skip is not None:
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip >= 0:
            raise PromptError(f"clip_skip={clip_skip!r}: use ComfyUI's CLIPSetLastLayer numbering "
                              "(-1 last layer, -2 penultimate, ...); diffusers' clip_skip=1 is -2 "
                              "for SD1/SD2 and -3 for SDXL")
        options["layer"] = clip_skip
    return options


def _empty_window(clip: CLIP, options: Mapping[str, Any]) -> torch.Tensor:
    """One 77-token window of the empty prompt's encoding, (77, width); SDXL: cat(l, g)."""
    model = clip.cond_stage_model
    parts = [model.clip_l, model.clip_g] if clip.clip_type == "sdxl" else [model.encoder]
    return torch.cat([empty_encoding(p, p.max_length, p.resolve_options(options))[0] for p in parts], -1)


def _padded(cond: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """(1, 77·w, D) → (1, length, D), appending whole windows of the empty encoding."""
    missing = (length - cond.shape[1]) // empty.shape[0]
    return torch.cat([cond] + [empty.unsqueeze(0).to(cond)] * missing, dim=1)


def _result(kind: str, positive: tuple, negative: tuple, target: _Target) -> dict[str, torch.Tensor]:
    """The pipeline's keyword arguments, every tensor in its dtype and on its device."""
    names = ["prompt_embeds", "negative_prompt_embeds"]
    values = [positive[0], negative[0]]
    if kind == "sdxl":
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        values += [positive[1], negative[1]]
    return {n: v.to(device=target.device, dtype=target.dtype) for n, v in zip(names, values)}


def encode_for_pipeline(pipe_or_loaded: Any, prompt: str | Sequence[str],
                        negative_prompt: str | Sequence[str] = "", *, clip_skip: int | None = None,
                        weight_mode: str = "comfy", zero_negative: bool = False,
                        embedding_directory: Any = None, device: Any = None,
                        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Encode prompts the ComfyUI way into the keyword arguments of a diffusers pipeline call.

    Args:
        pipe_or_loaded: a StableDiffusion(XL) pipeline (its CLIP is built once and
            cached on it as ``_textenc_clip``) or a CLIP from :func:`load_from_diffusers`.
        prompt: a prompt with ComfyUI syntax, or a list (one batch row each).
        negative_prompt: one negative (broadcast to the batch) or one per prompt.
        clip_skip: ComfyUI ``CLIPSetLastLayer`` numbering (-1 last, -2 penultimate);
            None: the model's default (SD1 -1, SD2 -2, SDXL -2). Applies to the negative too.
        weight_mode: see :mod:`textenc.weighting` (``"comfy"`` default).
        zero_negative: an empty negative becomes zeros (embeds and pooled), as
            diffusers' SDXL ``force_zeros_for_empty_prompt`` does for ``negative_prompt=None``.
        embedding_directory: textual-inversion folder(s) (pipeline objects only).
        device / dtype: override the pipeline's (or the CLIP's) device and dtype.

    Returns:
        ``prompt_embeds`` and ``negative_prompt_embeds`` (B, 77·windows, width),
        plus ``pooled_prompt_embeds`` and ``negative_pooled_prompt_embeds`` (B, P)
        for SDXL. Every row is padded to the longest with whole windows of the
        empty prompt's encoding.

    Raises:
        PromptError: bad prompt, weight or clip_skip. DiffusersLayoutError: not a
        supported pipeline.
    """
    target = _target(pipe_or_loaded, embedding_directory, device, dtype)
    clip = target.clip
    prompts = _prompt_list(prompt, "prompt")
    negatives = _negative_list(negative_prompt, len(prompts))
    options = _encode_options(clip_skip, weight_mode)
    encode = lambda text: clip.encode_from_tokens(clip.tokenize(text), return_pooled=True,  # noqa: E731
                                                   options=options)
    positive = [encode(p) for p in prompts]
    negative = [None if zero_negative and not n else encode(n) for n in negatives]
    length = max(cond.shape[1] for cond, _ in positive + [x for x in negative if x is not None])
    empty = _empty_window(clip, options)
    cond = torch.cat([_padded(c, length, empty) for c, _ in positive])
    negative_cond = torch.cat([_padded(x[0], length, empty) if x is not None else torch.zeros_like(cond[:1])
                               for x in negative])
    negative_pooled = torch.cat([x[1] if x is not None else torch.zeros_like(p)
                                 for x, (_, p) in zip(negative, positive)])
    return _result(clip.clip_type, (cond, torch.cat([p for _, p in positive])),
                   (negative_cond, negative_pooled), target)


# ---- already-encoded conditioning ------------------------------------------------------

def _cond_and_pooled(conditioning: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[[cond, {"pooled_output": p}]]`` or ``(cond, pooled)`` → (cond (B, T, D), pooled or None)."""
    if isinstance(conditioning, tuple) and len(conditioning) == 2 and isinstance(conditioning[0], torch.Tensor):
        conditioning = [[conditioning[0], {"pooled_output": conditioning[1]}]]
    validate_conditioning(conditioning, name=name)
    if len(conditioning) != 1:
        raise TextencError(f"{name} has {len(conditioning)} entries; a diffusers pipeline takes one "
                           "(ComfyUI samples combined conditionings separately): pass one entry")
    cond, extras = conditioning[0]
    return cond, extras.get("pooled_output")


def _repeat_to(cond: torch.Tensor, length: int) -> torch.Tensor:
    # Repeating every key k times leaves cross-attention unchanged (ComfyUI's
    # CONDCrossAttn.concat pads mismatched conds to their LCM the same way).
    return cond.repeat(1, length // cond.shape[1], 1)


def to_diffusers(conditioning: Any, negative: Any = None, *, kind: str) -> dict[str, torch.Tensor]:
    """Already-encoded conditioning → the pipeline's keyword arguments.

    Args:
        conditioning / negative: ComfyUI CONDITIONING (``[[cond, {"pooled_output": p}]]``)
            or a ``(cond, pooled)`` pair; cond (B, T, D). ``negative=None`` leaves
            the negative to the pipeline. A length mismatch is resolved as ComfyUI
            does: both are repeated to the least common multiple of their lengths.
        kind: ``"sd1"``, ``"sd2"`` or ``"sdxl"`` (SDXL needs pooled outputs).

    Raises:
        TextencError: malformed conditioning, several entries, missing pooled output.

    >>> out = to_diffusers((torch.ones(1, 77, 8), None), (torch.zeros(1, 154, 8), None), kind="sd1")
    >>> [tuple(v.shape) for v in out.values()]
    [(1, 154, 8), (1, 154, 8)]
    """
    if kind not in KINDS:
        raise TextencError(f"kind {kind!r} is not one of {KINDS}")
    positive = _cond_and_pooled(conditioning, "conditioning")
    pairs = [positive] + ([_cond_and_pooled(negative, "negative")] if negative is not None else [])
    if kind == "sdxl" and any(pooled is None for _, pooled in pairs):
        raise TextencError("SDXL needs pooled outputs: the conditioning has no 'pooled_output'")
    length = math.lcm(*(cond.shape[1] for cond, _ in pairs))
    pairs = [(_repeat_to(cond, length), pooled) for cond, pooled in pairs]
    result = {"prompt_embeds": pairs[0][0]}
    if negative is not None:
        result["negative_prompt_embeds"] = pairs[1][0].expand(pairs[0][0].shape[0], -1, -1) \
            if pairs[1][0].shape[0] == 1 else pairs[1][0]
    if kind == "sdxl":
        result["pooled_prompt_embeds"] = pairs[0][1]
        if negative is not None:
            result["negative_pooled_prompt_embeds"] = pairs[1][1].expand(pairs[0][1].shape[0], -1) \
                if pairs[1][1].shape[0] == 1 else pairs[1][1]
    return result
