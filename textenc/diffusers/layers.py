"""Which hidden layer a diffusers ``clip_skip`` means for a CLIP, in ComfyUI's numbering.

Part of :mod:`textenc.diffusers` (import from there). Two numberings meet here
(README, "Using textenc with diffusers", "Clip skip"):

* ``clip_skip`` is diffusers' count, relative to the layer the pipeline uses by
  default: SD1/SD2 ``hidden_states[-(clip_skip + 1)]`` with the final layer norm,
  SDXL ``hidden_states[-(clip_skip + 2)]`` without it (``encode_prompt`` in
  diffusers' ``pipeline_stable_diffusion.py`` / ``pipeline_stable_diffusion_xl.py``).
  It counts the text encoder's own layers.
* ``layer`` is ComfyUI's ``CLIPSetLastLayer`` index (-1 last, -2 penultimate, ...),
  which every ``SDClipModel`` checks and maps itself (:class:`textenc.text_encoders.clip_skip.LayerNumbering`):
  diffusers' 23-layer SD2 folders count as ViT-H's 24 layers there.

The layer each pipeline kind encodes with when ``clip_skip`` is None is its
family's ``diffusers_default_layer`` (:mod:`textenc.text_encoders.families`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import LayerError
from ..text_encoders.clip_skip import layer_from_clip_skip
from ..text_encoders.sd2_clip import VIT_H_LAYERS

if TYPE_CHECKING:
    from ..sd import CLIP

__all__ = ["VIT_H_LAYERS", "diffusers_layer"]


def diffusers_layer(clip: "CLIP", clip_skip: object) -> int:
    """ComfyUI's layer index for diffusers' ``clip_skip`` (0 = the pipeline's default layer).

    diffusers counts the layers the text encoder has; the result is in ComfyUI's
    numbering (on diffusers' 23-layer SD2 encoder, ``clip_skip=0`` is ``-2``).

    Raises:
        LayerError: negative, not an integer, or deeper than the text encoder.
    """
    if isinstance(clip_skip, int) and not isinstance(clip_skip, bool) and clip_skip < 0:
        raise LayerError(f"clip_skip={clip_skip}: encode_for_pipeline's clip_skip is diffusers' count "
                         "(0 or more; 1 = the layer before the pipeline's default); for ComfyUI's "
                         f"CLIPSetLastLayer numbering pass layer={clip_skip}")
    index = layer_from_clip_skip(clip_skip, clip.num_layers, numbering="diffusers",
                                 default_layer=clip.family.diffusers_default_layer)
    return clip.numbered_index(index)
