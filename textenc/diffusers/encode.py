"""Encode prompts for a diffusers Stable Diffusion pipeline, and hand ComfyUI
conditioning back as the pipeline's keyword arguments.

Part of :mod:`textenc.diffusers` (import from there). The pipeline's CLIP is
built by :func:`textenc.diffusers.load.load_from_diffusers` once and cached on
the pipeline object.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch

from ..conditioning import validate_conditioning
from ..prompts.dialects import DEFAULT_SYNTAX, default_weight_mode, dialect_options
from .layers import diffusers_layer
from .load import KINDS, diffusers_encoder_names, load_from_diffusers
from ..errors import ConditioningError, DiffusersLayoutError, LayerError, PromptError, TextencError
from ..sd import CLIP
from ..text_encoders.families import get_family
from ..text_encoders.sequences import t5_role
from .sequences import encode_sequences

__all__ = ["CACHE_ATTRIBUTE", "encode_for_pipeline", "to_diffusers"]

CACHE_ATTRIBUTE = "_textenc_clip"


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
    modules = tuple(getattr(pipe, name, None) for name in diffusers_encoder_names())
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
        model_dtype, model_device = _module_dtype_device(pipe_or_loaded.cond_stage_model)
        return _Target(pipe_or_loaded, torch.device(device or model_device), dtype or model_dtype)
    clip = _cached_clip(pipe_or_loaded, embedding_directory)
    # diffusers casts prompt embeddings to its last text encoder's dtype: SDXL's text_encoder_2,
    # SD3's text_encoder_3 (T5), Flux's text_encoder_2 (T5), SD1/SD2/Wan's text_encoder.
    names = [role.diffusers_text_encoder for role in reversed(clip.family.roles)]
    last = next(m for m in (getattr(pipe_or_loaded, n, None) for n in names) if m is not None)
    last_dtype, last_device = _module_dtype_device(last)
    pipe_device = getattr(pipe_or_loaded, "_execution_device", None) or last_device
    return _Target(clip, torch.device(device or pipe_device), dtype or last_dtype)


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


def _encode_options(clip: CLIP, *, clip_skip: Any, layer: Any, weight_mode: str | None,
                    syntax: str) -> dict[str, Any]:
    """Per-call options: the layer (ComfyUI's index, checked) and the weighting."""
    if clip_skip is not None and t5_role(clip.family) is not None:
        raise LayerError(f"clip_skip={clip_skip!r}: {clip.family.label} pipelines are encoded with ComfyUI's "
                         "layers, and diffusers' clip_skip (CLIP only) has no ComfyUI counterpart there; "
                         "pass layer= (ComfyUI's CLIPSetLastLayer, applied to every part as ComfyUI does)")
    if clip_skip is not None and layer is not None:
        raise LayerError(f"clip_skip={clip_skip!r} and layer={layer!r} both given: pass clip_skip "
                         "(diffusers' numbering) or layer (ComfyUI's), not both")
    options: dict[str, Any] = {"weight_mode": default_weight_mode(syntax) if weight_mode is None
                               else weight_mode}
    if clip_skip is not None:
        options["layer"] = diffusers_layer(clip, clip_skip)
    elif layer is not None:
        options["layer"] = clip.check_layer(layer)
    elif clip.layer_idx is not None:  # a CLIP given with clip_layer() already set
        options["layer"] = clip.layer_idx
    return options


def _padded(cond: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """(1, 77·w, D) → (1, length, D), appending whole windows of the empty encoding."""
    missing = (length - cond.shape[1]) // empty.shape[0]
    return torch.cat([cond] + [empty.unsqueeze(0).to(cond)] * missing, dim=1)


def _result(kind: str, positive: tuple, negative: tuple, target: _Target) -> dict[str, torch.Tensor]:
    # (the pooled rows of a family without a pooled output, Wan, are None and not returned)
    """The pipeline's keyword arguments, every tensor in its dtype and on its device."""
    names = ["prompt_embeds", "negative_prompt_embeds"]
    values = [positive[0], negative[0]]
    if get_family(kind).diffusers_pooled:
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        values += [positive[1], negative[1]]
    return {n: v.to(device=target.device, dtype=target.dtype) for n, v in zip(names, values)}


def encode_for_pipeline(pipe_or_loaded: Any, prompt: str | Sequence[str],
                        negative_prompt: str | Sequence[str] = "", *, clip_skip: int | None = None,
                        layer: int | None = None, syntax: str = DEFAULT_SYNTAX,
                        truncate_long_prompts: bool = True,
                        weight_mode: str | None = None, zero_negative: bool = False,
                        embedding_directory: Any = None, device: Any = None,
                        dtype: torch.dtype | None = None, max_sequence_length: int | None = None,
                        fast_pooled: bool = False) -> dict[str, torch.Tensor]:
    """Encode prompts the ComfyUI way into the keyword arguments of a diffusers pipeline call
    (``StableDiffusion*``, ``StableDiffusionXL*``, ``StableDiffusion3*``, ``Flux*``, ``Wan*``).

    Args:
        pipe_or_loaded: a StableDiffusion(XL) pipeline (its CLIP is built once and
            cached on it as ``_textenc_clip``) or a CLIP from :func:`load_from_diffusers`.
        prompt: a prompt in ``syntax``, or a list (one batch row each).
        negative_prompt: one negative (broadcast to the batch) or one per prompt.
        clip_skip: diffusers' count, the same hidden layer as ``pipe(..., clip_skip=)``:
            SD1/SD2 ``hidden_states[-(clip_skip + 1)]`` with the final norm, SDXL
            ``hidden_states[-(clip_skip + 2)]`` without. Applies to the negative too.
        layer: ComfyUI's ``CLIPSetLastLayer`` index instead (-1 last, -2 penultimate;
            diffusers' 23-layer SD2 encoder counts as ViT-H's 24, so -2 is its last).
            Neither: the CLIP's ``clip_layer()`` if set, else the model's ComfyUI
            default (SD1 -1, SD2 -2, SDXL -2).
        syntax: prompt dialect, one of :data:`textenc.prompts.dialects.SYNTAXES` (``"comfy"``);
            ``"compel"`` on a FluxPipeline gives what compel's ``CompelForFlux`` gives; SD3 and
            Wan take ``"comfy"`` only (docs/families.md, "Prompt syntaxes").
        truncate_long_prompts: ``syntax="compel"`` only, as compel's: True (default)
            keeps one 77-token window; False cuts a long prompt into compel's chunks,
            and the rows are padded as compel's ``pad_conditioning_tensors_to_same_length``
            pads them. Another syntax refuses False.
        weight_mode: see :mod:`textenc.text_encoders.weighting`; None: the syntax's own
            (:func:`textenc.prompts.dialects.default_weight_mode`).
        zero_negative: an empty negative becomes zeros (embeds and pooled), as
            diffusers' SDXL ``force_zeros_for_empty_prompt`` does for ``negative_prompt=None``.
        embedding_directory: textual-inversion folder(s) (pipeline objects only).
        device / dtype: override the pipeline's (or the CLIP's) device and dtype.
        max_sequence_length: SD3, Flux, Wan: pad T5 to at least this many tokens before
            encoding, as the pipeline's own ``max_sequence_length`` (SD3 256, Flux 512, Wan
            512) pads it; None: ComfyUI's minimum (77, 256, 512). Never truncates. With
            ``syntax="compel"`` (Flux, as compel's ``CompelForFlux``) T5 is compel's chunk,
            ``tokenizer_2.model_max_length`` tokens, and a larger value is a PromptError.
        fast_pooled: at an intermediate layer, run the layers after it for the pooled
            row only: faster, and the pooled output then differs from ComfyUI's by fp32
            rounding (≤ 2.5e-6); see :class:`textenc.text_encoders.options.ClipOptions`.

    Returns:
        ``prompt_embeds`` and ``negative_prompt_embeds`` (B, 77·windows, width),
        plus ``pooled_prompt_embeds`` and ``negative_pooled_prompt_embeds`` (B, P)
        for SDXL, SD3 and Flux. SD1/SD2/SDXL rows are padded to the longest with whole
        windows of the empty prompt's encoding; SD3/Flux/Wan rows as
        :mod:`textenc.diffusers.sequences` says.

    Raises:
        LayerError: clip_skip or layer outside the text encoder's depth (naming the
        value and the valid range), or both given; clip_skip for SD3, Flux or Wan. PromptError: bad prompt, weight
        or syntax, or ``truncate_long_prompts=False`` without ``syntax="compel"``.
        DiffusersLayoutError: not a supported pipeline.
    """
    tokenize_kwargs = dialect_options(syntax, {"truncate_long_prompts": truncate_long_prompts})
    target = _target(pipe_or_loaded, embedding_directory, device, dtype)
    options = _encode_options(target.clip, clip_skip=clip_skip, layer=layer, weight_mode=weight_mode,
                              syntax=syntax)
    if fast_pooled:
        options["fast_pooled"] = True
    clip = target.clip.clone()
    clip.clip_layer(None)  # the layer travels in options, so the padding windows use it too
    prompts = _prompt_list(prompt, "prompt")
    negatives = _negative_list(negative_prompt, len(prompts))
    texts = prompts + [n for n in negatives if n or not zero_negative]
    tokens = [clip.tokenize(text, syntax=syntax, **tokenize_kwargs) for text in texts]
    if t5_role(clip.family) is not None:
        encoded = encode_sequences(clip, tokens, options, max_sequence_length=max_sequence_length)
    else:
        if max_sequence_length is not None:
            raise TextencError(f"max_sequence_length is for T5 pipelines (SD3, Flux, Wan), not {clip.family.label}")
        encoded = _encode_windows(clip, tokens, options)
    by_text = iter(encoded)
    positive = [next(by_text) for _ in prompts]
    negative = [next(by_text) if n or not zero_negative else None for n in negatives]
    cond = torch.cat([c for c, _ in positive])
    negative_cond = torch.cat([x[0] if x is not None else torch.zeros_like(cond[:1]) for x in negative])
    return _result(clip.clip_type, (cond, _pooled([p for _, p in positive])),
                   (negative_cond, _pooled([x[1] if x is not None else None for x in negative], positive)),
                   target)


def _encode_windows(clip: CLIP, tokens: Sequence[Mapping[str, list]], options: Mapping[str, Any]) -> list:
    """SD1/SD2/SDXL: each prompt's ``(cond, pooled)``, conds padded to the longest with whole
    windows of the empty prompt's encoding."""
    encoded = [clip.encode_from_tokens(t, return_pooled=True, options=options) for t in tokens]
    length = max(cond.shape[1] for cond, _ in encoded)
    empty = clip.empty_window(options)
    return [(_padded(cond, length, empty), pooled) for cond, pooled in encoded]


def _pooled(rows: Sequence[torch.Tensor | None], like: Sequence[tuple] | None = None) -> torch.Tensor | None:
    """Rows of pooled outputs as a batch; a missing row (a zeroed negative) is zeros; None
    where the family has no pooled output (Wan)."""
    reference = next((r for r in rows if r is not None), None)
    if reference is None and like is not None:
        reference = next((p for _, p in like if p is not None), None)
    if reference is None:
        return None
    return torch.cat([r if r is not None else torch.zeros_like(reference) for r in rows])


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


def _same_length(pairs: list[tuple], family: Any) -> list[tuple]:
    """Positive and negative conds as the family's pipeline takes them
    (:attr:`~textenc.text_encoders.registry.Family.unequal_lengths`)."""
    lengths = [cond.shape[1] for cond, _ in pairs]
    if len(set(lengths)) == 1 or family.unequal_lengths == "keep":
        return pairs
    if family.unequal_lengths == "refuse":
        raise ConditioningError(
            f"{family.label}: the conditioning has {lengths[0]} tokens and the negative {lengths[1]}; "
            f"{family.label}'s pipeline batches both in one tensor, and no padding of its joint attention "
            "gives ComfyUI's result (ComfyUI samples conds of different lengths separately). Encode both "
            "with encode_for_pipeline (one T5 length, as the pipeline's own max_sequence_length), or at "
            "one length in ComfyUI (the same number of 77-token CLIP windows and T5 tokens)")
    length = math.lcm(*lengths)
    return [(_repeat_to(cond, length), pooled) for cond, pooled in pairs]


def to_diffusers(conditioning: Any, negative: Any = None, *, kind: str) -> dict[str, torch.Tensor]:
    """Already-encoded conditioning → the pipeline's keyword arguments.

    Args:
        conditioning / negative: ComfyUI CONDITIONING (``[[cond, {"pooled_output": p}]]``)
            or a ``(cond, pooled)`` pair; cond (B, T, D). ``negative=None`` leaves
            the negative to the pipeline. Conds of different lengths, by family
            (docs/diffusers.md, "Conditioning of different lengths"): SD1/SD2/SDXL repeat both
            to the least common multiple of the lengths, as ComfyUI's ``CONDCrossAttn``
            (cross-attention is unchanged by repeated keys); Flux and Wan keep each its own
            length (their pipelines run the negative in a pass of its own, as ComfyUI samples
            such conds separately); SD3 refuses them.
        kind: a family name (``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sd3"``, ``"flux"``, ``"wan"``);
            SDXL, SD3 and Flux need pooled outputs.

    Raises:
        TextencError: malformed conditioning, several entries, missing pooled output.
        ConditioningError: SD3 conds of different lengths.

    >>> out = to_diffusers((torch.ones(1, 77, 8), None), (torch.zeros(1, 154, 8), None), kind="sd1")
    >>> [tuple(v.shape) for v in out.values()]
    [(1, 154, 8), (1, 154, 8)]
    """
    if kind not in KINDS:
        raise TextencError(f"kind {kind!r} is not one of {KINDS}")
    positive = _cond_and_pooled(conditioning, "conditioning")
    pairs = [positive] + ([_cond_and_pooled(negative, "negative")] if negative is not None else [])
    family = get_family(kind)
    takes_pooled = family.diffusers_pooled
    if takes_pooled and any(pooled is None for _, pooled in pairs):
        raise TextencError(f"{family.label} needs pooled outputs: the conditioning has no 'pooled_output'")
    pairs = _same_length(pairs, family)
    result = {"prompt_embeds": pairs[0][0]}
    if negative is not None:
        result["negative_prompt_embeds"] = pairs[1][0].expand(pairs[0][0].shape[0], -1, -1) \
            if pairs[1][0].shape[0] == 1 else pairs[1][0]
    if takes_pooled:
        result["pooled_prompt_embeds"] = pairs[0][1]
        if negative is not None:
            result["negative_pooled_prompt_embeds"] = pairs[1][1].expand(pairs[0][1].shape[0], -1) \
                if pairs[1][1].shape[0] == 1 else pairs[1][1]
    return result
