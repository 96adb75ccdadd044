"""ComfyUI CONDITIONING helpers: unCLIP, concat, combine, average, zero out, set values.

A CONDITIONING is a list of ``[cond, extras]`` pairs: ``cond`` is a float
tensor (batch, tokens, width) and ``extras`` a dict such as
``{"pooled_output": tensor}``. Every function here returns new lists and new
dicts and never mutates its inputs (tensors are shared, not copied, where they
are unchanged), matching the ComfyUI nodes named in each docstring.

>>> import torch
>>> cond = [[torch.ones(1, 2, 3), {"pooled_output": torch.ones(1, 3)}]]
>>> zeroed = conditioning_zero_out(cond)
>>> float(zeroed[0][0].abs().sum()), float(zeroed[0][1]["pooled_output"].sum())
(0.0, 0.0)
>>> float(cond[0][0].sum())  # the input is untouched
6.0
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from .errors import TextencError

__all__ = [
    "Conditioning",
    "validate_conditioning",
    "conditioning_set_values",
    "unclip_conditioning",
    "conditioning_concat",
    "conditioning_combine",
    "conditioning_average",
    "conditioning_zero_out",
]

logger = logging.getLogger(__name__)

#: ComfyUI's CONDITIONING type: ``[[cond (B, T, D), {"pooled_output": ...}], ...]``.
Conditioning = list


def validate_conditioning(conditioning: Any, *, name: str = "conditioning") -> None:
    """Check that ``conditioning`` is a non-empty list of ``[cond (B, T, D), dict]`` pairs.

    Raises:
        TextencError: naming the argument, the entry index and what was wrong.

    >>> validate_conditioning([[torch.zeros(1, 77, 768), {}]])
    >>> validate_conditioning([[torch.zeros(77, 768), {}]], name="positive")
    Traceback (most recent call last):
    ...
    textenc.errors.TextencError: positive[0]: cond must be a 3-d tensor (batch, tokens, width), got shape (77, 768)
    """
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise TextencError(f"{name} must be a non-empty list of [cond, dict] pairs, "
                           f"got {type(conditioning).__name__}")
    for index, entry in enumerate(conditioning):
        where = f"{name}[{index}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise TextencError(f"{where}: expected a [cond, dict] pair, got {entry!r:.80}")
        cond, extras = entry
        if not isinstance(cond, torch.Tensor) or not cond.is_floating_point() or cond.ndim != 3:
            shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise TextencError(f"{where}: cond must be a 3-d tensor (batch, tokens, width), "
                               f"got shape {shape}")
        if not isinstance(extras, dict):
            raise TextencError(f"{where}: extras must be a dict, got {type(extras).__name__}")
        pooled = extras.get("pooled_output")
        if pooled is not None and not isinstance(pooled, torch.Tensor):
            raise TextencError(f"{where}: pooled_output must be a tensor or None, "
                               f"got {type(pooled).__name__}")


def _finite_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TextencError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def unclip_conditioning(conditioning: Conditioning, clip_vision_output: Any,
                        strength: float, noise_augmentation: float) -> Conditioning:
    """Attach a CLIP vision output to every entry (ComfyUI ``unCLIPConditioning``).

    Args:
        conditioning: The CONDITIONING to extend.
        clip_vision_output: A :class:`textenc.vision.clip_vision.ClipVisionOutput`
            (anything with a tensor ``image_embeds``).
        strength: Weight of the image embedding; 0 returns ``conditioning`` itself.
        noise_augmentation: Noise level in [0, 1] applied by the unCLIP model.

    Returns:
        New pairs whose dicts get ``unclip_conditioning`` = the existing list plus
        ``{"clip_vision_output", "strength", "noise_augmentation"}``.

    Raises:
        TextencError: malformed conditioning, output without ``image_embeds``,
            non-finite strength or noise outside [0, 1].

    >>> from types import SimpleNamespace
    >>> out = SimpleNamespace(image_embeds=torch.zeros(1, 768))
    >>> cond = [[torch.zeros(1, 77, 768), {}]]
    >>> new = unclip_conditioning(cond, out, 1.0, 0.1)
    >>> new[0][1]["unclip_conditioning"][0]["strength"], "unclip_conditioning" in cond[0][1]
    (1.0, False)
    """
    validate_conditioning(conditioning)
    strength = _finite_number(strength, "strength")
    noise = _finite_number(noise_augmentation, "noise_augmentation")
    if not 0.0 <= noise <= 1.0:
        raise TextencError(f"noise_augmentation must be in [0, 1], got {noise_augmentation!r}")
    if not isinstance(getattr(clip_vision_output, "image_embeds", None), torch.Tensor):
        raise TextencError("clip_vision_output has no image_embeds tensor; pass the output "
                           "of ClipVisionModel.encode_image")
    if strength == 0:
        return conditioning
    entry = {"clip_vision_output": clip_vision_output, "strength": strength,
             "noise_augmentation": noise}
    out = []
    for cond, extras in conditioning:
        new_extras = dict(extras)
        new_extras["unclip_conditioning"] = list(extras.get("unclip_conditioning", [])) + [entry]
        out.append([cond, new_extras])
    return out


def _first_of(conditioning_from: Conditioning, node: str) -> tuple[torch.Tensor, dict]:
    if len(conditioning_from) > 1:
        # Same behaviour and warning as ComfyUI's nodes.py.
        logger.warning("%s: conditioning_from has %d entries; only the first is applied",
                       node, len(conditioning_from))
    return conditioning_from[0][0], conditioning_from[0][1]


def _check_width(to: torch.Tensor, src: torch.Tensor, index: int, node: str) -> None:
    if to.shape[2] != src.shape[2]:
        raise TextencError(f"{node}: conditioning_to[{index}] has width {to.shape[2]} but "
                           f"conditioning_from has width {src.shape[2]}; both must come "
                           "from the same text encoder")
    if to.shape[0] != src.shape[0] and 1 not in (to.shape[0], src.shape[0]):
        raise TextencError(f"{node}: conditioning_to[{index}] has batch {to.shape[0]} and "
                           f"conditioning_from has batch {src.shape[0]}; they must match or be 1")


def conditioning_concat(conditioning_to: Conditioning,
                        conditioning_from: Conditioning) -> Conditioning:
    """Append the first ``from`` cond along tokens to each ``to`` cond (ComfyUI ``ConditioningConcat``).

    Extras (pooled output, ...) come from ``conditioning_to``.

    >>> to = [[torch.zeros(1, 2, 4), {"pooled_output": torch.zeros(1, 4)}]]
    >>> tuple(conditioning_concat(to, [[torch.ones(1, 3, 4), {}]])[0][0].shape)
    (1, 5, 4)
    """
    validate_conditioning(conditioning_to, name="conditioning_to")
    validate_conditioning(conditioning_from, name="conditioning_from")
    cond_from, _ = _first_of(conditioning_from, "ConditioningConcat")
    out = []
    for index, (cond, extras) in enumerate(conditioning_to):
        _check_width(cond, cond_from, index, "ConditioningConcat")
        batch = max(cond.shape[0], cond_from.shape[0])
        parts = [t.to(cond.dtype).expand(batch, -1, -1) for t in (cond, cond_from)]
        out.append([torch.cat(parts, dim=1), dict(extras)])
    return out


def conditioning_combine(conditioning_1: Conditioning,
                         conditioning_2: Conditioning) -> Conditioning:
    """Both lists of entries, one after the other (ComfyUI ``ConditioningCombine``).

    >>> a, b = [[torch.zeros(1, 1, 2), {}]], [[torch.ones(1, 1, 2), {}]]
    >>> len(conditioning_combine(a, b))
    2
    """
    validate_conditioning(conditioning_1, name="conditioning_1")
    validate_conditioning(conditioning_2, name="conditioning_2")
    return [[cond, dict(extras)] for cond, extras in (*conditioning_1, *conditioning_2)]


def _fit_tokens(source: torch.Tensor, tokens: int) -> torch.Tensor:
    """Cut ``source`` (B, T, D) to ``tokens`` rows, or pad it with zero rows."""
    source = source[:, :tokens]
    if source.shape[1] < tokens:
        pad = source.new_zeros(source.shape[0], tokens - source.shape[1], source.shape[2])
        source = torch.cat([source, pad], dim=1)
    return source


def conditioning_average(conditioning_to: Conditioning, conditioning_from: Conditioning,
                         conditioning_to_strength: float) -> Conditioning:
    """Blend each ``to`` entry with the first ``from`` entry (ComfyUI ``ConditioningAverage``).

    ``result = to * s + from * (1 - s)``. The ``from`` cond is cut or
    zero-padded to the ``to`` token count. Pooled outputs are blended when both
    exist; when only ``from`` has one it is used as is.

    >>> to = [[torch.ones(1, 2, 1), {}]]
    >>> src = [[torch.full((1, 1, 1), 3.0), {}]]
    >>> conditioning_average(to, src, 0.25)[0][0].flatten().tolist()
    [2.5, 0.25]
    """
    validate_conditioning(conditioning_to, name="conditioning_to")
    validate_conditioning(conditioning_from, name="conditioning_from")
    strength = _finite_number(conditioning_to_strength, "conditioning_to_strength")
    cond_from, extras_from = _first_of(conditioning_from, "ConditioningAverage")
    pooled_from = extras_from.get("pooled_output")
    out = []
    for index, (cond, extras) in enumerate(conditioning_to):
        _check_width(cond, cond_from, index, "ConditioningAverage")
        source = _fit_tokens(cond_from.to(cond.dtype), cond.shape[1])
        new_extras = dict(extras)
        pooled_to = extras.get("pooled_output")
        if pooled_from is not None and pooled_to is not None:
            new_extras["pooled_output"] = pooled_to * strength + pooled_from * (1.0 - strength)
        elif pooled_from is not None:
            new_extras["pooled_output"] = pooled_from
        out.append([cond * strength + source * (1.0 - strength), new_extras])
    return out


def conditioning_zero_out(conditioning: Conditioning) -> Conditioning:
    """Zeros in place of every cond and pooled output (ComfyUI ``ConditioningZeroOut``)."""
    validate_conditioning(conditioning)
    out = []
    for cond, extras in conditioning:
        new_extras = dict(extras)
        if extras.get("pooled_output") is not None:
            new_extras["pooled_output"] = torch.zeros_like(extras["pooled_output"])
        out.append([torch.zeros_like(cond), new_extras])
    return out



def conditioning_set_values(conditioning: Conditioning, values: dict[str, Any]) -> Conditioning:
    """Every entry with ``values`` set in its extras, replacing what was there (ComfyUI's
    ``node_helpers.conditioning_set_values``, as ``FluxGuidance`` uses it: ``{"guidance": 3.5}``).

    >>> cond = [[torch.zeros(1, 2, 3), {"guidance": 3.5}]]
    >>> conditioning_set_values(cond, {"guidance": 2.0})[0][1], cond[0][1]
    ({'guidance': 2.0}, {'guidance': 3.5})
    """
    validate_conditioning(conditioning)
    return [[cond, {**extras, **values}] for cond, extras in conditioning]
