"""``ClipOptions``: everything that changes one text encoding, hashable for caches.

Kept apart from :mod:`textenc.text_encoders.sd1_clip` so the encoding functions
(:mod:`textenc.text_encoders.encode`) can use it without importing the model class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from ..errors import PromptError
from .clip_skip import LayerNumbering
from .weighting import check_mode

__all__ = ["ClipOptions"]


@dataclasses.dataclass(frozen=True)
class ClipOptions:
    """Everything that changes an encoding; hashable, so it keys the caches.

    ``layer_idx`` is ComfyUI's index (``CLIPSetLastLayer`` numbering, as
    ComfyUI's ``SDClipModel.layer_idx``); the encoder's
    :class:`~textenc.text_encoders.clip_skip.LayerNumbering` turns it into its own index at the forward.
    ``fast_pooled`` (off: ComfyUI's bits) runs the layers after an intermediate
    ``layer`` for the pooled row only: faster, and pooled then differs from
    ComfyUI's by fp32 rounding (≤ 2.5e-6); cond is the same either way.
    """

    layer: str = "last"
    layer_idx: int | None = None
    layer_norm_hidden_state: bool = True
    return_projected_pooled: bool = True
    weight_mode: str = "comfy"
    normalization: str = "none"
    compute_dtype: torch.dtype = torch.float32
    fast_pooled: bool = False

    def updated(self, options: Mapping[str, Any], numbering: LayerNumbering) -> "ClipOptions":
        """Apply ComfyUI's ``set_clip_options`` rules to a copy; ``options["layer"]`` is
        checked against ``numbering`` (the encoder's, see :class:`~textenc.text_encoders.clip_skip.LayerNumbering`).

        Raises:
            LayerError: a layer the encoder does not have.
            PromptError: an unknown option, weight mode or normalization.
        """
        changes: dict[str, Any] = {}
        if "layer" in options and self.layer != "all":
            idx = options["layer"]
            if idx is None:
                changes.update(layer="last", layer_idx=None)
            else:  # out of range is a LayerError (ComfyUI silently uses the last layer)
                changes.update(layer="hidden", layer_idx=numbering.check(idx))
        if "projected_pooled" in options:
            changes["return_projected_pooled"] = bool(options["projected_pooled"])
        for key in ("weight_mode", "normalization", "compute_dtype", "layer_norm_hidden_state"):
            if key in options:
                changes[key] = options[key]
        if "fast_pooled" in options:
            if not isinstance(options["fast_pooled"], bool):
                raise PromptError(f"clip option fast_pooled must be True or False, got {options['fast_pooled']!r}")
            changes["fast_pooled"] = options["fast_pooled"]
        known = ("compute_dtype", "fast_pooled", "layer", "layer_norm_hidden_state", "normalization",
                 "projected_pooled", "weight_mode")
        unknown = set(options) - set(known)
        if unknown:
            raise PromptError(f"unknown clip option(s) {sorted(unknown)}; the options are {', '.join(known)}")
        result = dataclasses.replace(self, **changes)
        check_mode(result.weight_mode, result.normalization)
        return result
