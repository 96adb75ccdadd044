"""Which hidden layer a diffusers ``clip_skip`` or a ComfyUI ``layer`` means for a CLIP.

Part of :mod:`textenc.diffusers` (import from there). Two numberings meet here
(README, "Using textenc with diffusers", "Clip skip"):

* ``clip_skip`` is diffusers' count, relative to the layer the pipeline uses by
  default: SD1/SD2 ``hidden_states[-(clip_skip + 1)]`` with the final layer norm,
  SDXL ``hidden_states[-(clip_skip + 2)]`` without it (``encode_prompt`` in
  diffusers' ``pipeline_stable_diffusion.py`` / ``pipeline_stable_diffusion_xl.py``).
* ``layer`` is ComfyUI's ``CLIPSetLastLayer`` index (-1 last, -2 penultimate, ...).

stabilityai's diffusers SD2 folders ship OpenCLIP ViT-H's text encoder with its
last layer dropped (23 of 24 layers; SD2 uses the penultimate one, which is
then the last). ComfyUI loads such a folder into its 24-layer model, so its
numbering counts the dropped layer: ``-2`` (SD2's default) is the folder's last
layer and ``-1`` does not exist. textenc counts the same way.

>>> DIFFUSERS_DEFAULT_LAYER["sdxl"]
-2
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import LayerError
from .layers import check_layer, layer_from_clip_skip

__all__ = ["DIFFUSERS_DEFAULT_LAYER", "VIT_H_LAYERS", "text_encoders", "dropped_layers",
           "comfy_layer", "diffusers_layer", "use_vit_h_penultimate"]

#: The layer each pipeline kind encodes with when ``clip_skip`` is None (diffusers 0.42).
DIFFUSERS_DEFAULT_LAYER = {"sd1": -1, "sd2": -1, "sdxl": -2}
#: OpenCLIP ViT-H/14's depth (SD2's text encoder).
VIT_H_LAYERS = 24


def text_encoders(clip: Any) -> list:
    """The ``SDClipModel`` parts of a textenc CLIP (SDXL: clip_l and clip_g)."""
    model = clip.cond_stage_model
    return [model.clip_l, model.clip_g] if clip.clip_type == "sdxl" else [model.encoder]


def _depth(clip: Any) -> int:
    """The smallest depth among the CLIP's encoders (a layer must exist in each)."""
    return min(encoder.num_layers for encoder in text_encoders(clip))


def dropped_layers(clip: Any) -> int:
    """1 for an SD2 text encoder of 23 layers (ViT-H without its last), else 0."""
    return 1 if clip.clip_type == "sd2" and _depth(clip) == VIT_H_LAYERS - 1 else 0


def comfy_layer(clip: Any, layer: object) -> int:
    """The CLIP's own layer index for ComfyUI's ``layer`` (counting a dropped ViT-H layer).

    Raises:
        LayerError: not an integer, or a layer the text encoder does not have.

    The index returned is negative when ``layer`` is.
    """
    depth, dropped = _depth(clip), dropped_layers(clip)
    index = check_layer(layer, depth + dropped)
    if index >= depth or (dropped and index == -1):
        raise LayerError(f"layer {layer} is ViT-H's last layer, which this SD2 text encoder does not "
                         f"have ({depth} layers, as diffusers' SD2 folders ship it); valid layers are "
                         f"-{depth + dropped}..-2 (from the end) or 0..{depth - 1} (from the start)")
    return index + dropped if index < 0 else index


def diffusers_layer(clip: Any, clip_skip: object) -> int:
    """The CLIP's own layer index for diffusers' ``clip_skip`` (0 = the pipeline's default layer).

    Raises:
        LayerError: negative, not an integer, or deeper than the text encoder.
    """
    if isinstance(clip_skip, int) and not isinstance(clip_skip, bool) and clip_skip < 0:
        raise LayerError(f"clip_skip={clip_skip}: encode_for_pipeline's clip_skip is diffusers' count "
                         "(0 or more; 1 = the layer before the pipeline's default); for ComfyUI's "
                         f"CLIPSetLastLayer numbering pass layer={clip_skip}")
    return layer_from_clip_skip(clip_skip, _depth(clip), numbering="diffusers",
                                default_layer=DIFFUSERS_DEFAULT_LAYER[clip.clip_type])


def use_vit_h_penultimate(clip: Any) -> None:
    """Make a 23-layer SD2 CLIP default to its last layer: ViT-H's penultimate, SD2's default."""
    if not dropped_layers(clip):
        return
    for encoder in text_encoders(clip):
        encoder.options_default = dataclasses.replace(encoder.options_default, layer="hidden",
                                                      layer_idx=-1)
        encoder.reset_clip_options()
