"""Clip skip: one rule, three numberings, one resolved layer.

Every entry point resolves what the user typed into ComfyUI's layer index
(``CLIPSetLastLayer`` numbering: ``-1`` the last layer, ``-2`` the
penultimate, ``0``..``n-1`` counted from the first) and records that index.
The *name* of an option says its numbering:

* ``layer`` (``clip_layer()``, ``options={"layer": ...}``,
  ``set_clip_options``, the nodes): ComfyUI's own index, unchanged.
* ``clip_skip`` on the command line and in ``encode_dataset``: A1111's and
  civitai's count, ``1`` = the last layer, ``2`` = the penultimate, so
  ``clip_skip=n`` is ``layer=-n``. ComfyUI's ``-1``/``-2`` are accepted too
  (users paste both).
* ``clip_skip`` in ``encode_for_pipeline``: diffusers' count, relative to the
  pipeline's default layer (``1`` = one layer before it).

>>> layer_from_clip_skip(2, 12, numbering="a1111")
-2
>>> layer_from_clip_skip(-2, 12, numbering="a1111")
-2
>>> layer_from_clip_skip(1, 12, numbering="diffusers")
-2
>>> check_layer(-13, 12)
Traceback (most recent call last):
...
textenc.errors.LayerError: layer -13 is out of range for a 12-layer text encoder: valid layers are -12..-1 (from the end) or 0..11 (from the start)
"""

from __future__ import annotations

from .errors import LayerError

__all__ = ["NUMBERINGS", "check_layer", "layer_from_clip_skip"]

NUMBERINGS = ("comfy", "a1111", "diffusers")


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, bool) or float(value) != int(value):  # type: ignore[arg-type]
                raise ValueError
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise LayerError(f"{name} must be an integer, got {value!r}") from None
    return value


def check_layer(layer: object, num_layers: int) -> int:
    """ComfyUI's layer index, checked against the model's depth.

    Raises:
        LayerError: not an integer, or outside ``-num_layers..num_layers-1``.
    """
    index = _as_int(layer, "layer")
    if not -num_layers <= index < num_layers:
        raise LayerError(f"layer {index} is out of range for a {num_layers}-layer text encoder: "
                         f"valid layers are -{num_layers}..-1 (from the end) or 0..{num_layers - 1} "
                         "(from the start)")
    return index


def layer_from_clip_skip(clip_skip: object, num_layers: int, *, numbering: str = "a1111",
                         default_layer: int = -1) -> int:
    """ComfyUI's layer index for a clip-skip count in ``numbering``.

    Args:
        clip_skip: the count the user gave.
        num_layers: the text encoder's depth.
        numbering: ``"a1111"`` (1 = last; ComfyUI's -1/-2 accepted as well),
            ``"diffusers"`` (n layers before ``default_layer``; 0 = the default)
            or ``"comfy"`` (already a layer index).
        default_layer: the layer the model uses without clip skip (diffusers:
            -1 for SD1/SD2, -2 for SDXL).

    Raises:
        LayerError: not an integer, 0 in A1111 numbering, negative in
            diffusers numbering, or beyond the model's depth.
    """
    count = _as_int(clip_skip, "clip_skip")
    if numbering == "comfy":
        return check_layer(count, num_layers)
    if numbering == "a1111":
        if count == 0:
            raise LayerError(f"clip_skip 0 does not exist: 1 is the last layer, 2 the penultimate, "
                             f"up to {num_layers} (or ComfyUI's -1..-{num_layers})")
        layer = -abs(count)
    elif numbering == "diffusers":
        if count < 0:
            raise LayerError(f"clip_skip {count}: diffusers counts layers skipped, 0 or more")
        layer = default_layer - count
    else:
        raise LayerError(f"unknown clip-skip numbering {numbering!r}; choose one of {NUMBERINGS}")
    if layer < -num_layers:
        top = num_layers + default_layer if numbering == "diffusers" else num_layers
        raise LayerError(f"clip_skip {count} is out of range for a {num_layers}-layer text encoder "
                         f"({numbering} numbering allows up to {top})")
    return layer
