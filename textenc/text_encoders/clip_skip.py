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

ComfyUI numbers a text encoder as the released model it comes from, also when
the file lacks that model's last layer: diffusers' SD2 ``text_encoder`` keeps
23 of OpenCLIP ViT-H's 24 layers, and ComfyUI loads it into its 24-layer model,
so ``-2`` (SD2's default) is the file's last layer and ``-1`` does not exist.
:class:`LayerNumbering` is that translation, and the only place that knows it:
each ``SDClipModel`` holds one and every entry point goes through it.

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

import dataclasses

from ..errors import LayerError

__all__ = ["NUMBERINGS", "LayerNumbering", "check_clip_skip", "check_layer", "layer_from_clip_skip"]

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


def check_clip_skip(clip_skip: object) -> int:
    """The checks of an A1111 clip-skip count that need no model (its depth is checked
    from the files' headers or once loaded): a whole number, not 0. Entry points call it
    before loading weights.

    >>> check_clip_skip(2), check_clip_skip(-2)
    (2, -2)

    Raises:
        LayerError: not an integer, or 0.
    """
    count = _as_int(clip_skip, "clip_skip")
    if count == 0:
        raise LayerError("clip_skip 0 does not exist: 1 is the last layer, 2 the penultimate, and so on up to "
                         "the model's depth (or ComfyUI's -1, -2, ...)")
    return count


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


@dataclasses.dataclass(frozen=True)
class LayerNumbering:
    """ComfyUI's layer numbering of one text encoder, and the model's own index for it.

    Attributes:
        depth: the layers the loaded model has.
        numbered: the layers ComfyUI counts: the released model's depth when the
            file lacks its last layer(s), else ``depth``.
        model: the released model's name (``"ViT-H"``), named in errors.

    Indices are ComfyUI's (``CLIPSetLastLayer``) on the way in; only
    :meth:`model_index` gives an index into the loaded layers.

    >>> vit_h = LayerNumbering.of(23, released=("ViT-H", 24))
    >>> vit_h.numbered, vit_h.model_index(-2), vit_h.model_index(22), vit_h.numbered_index(-1)
    (24, -1, 22, -2)
    >>> vit_h.check(-1)
    Traceback (most recent call last):
    ...
    textenc.errors.LayerError: layer -1 is ViT-H's last layer, which this text encoder does not have: its file holds 23 of ViT-H's 24 layers (numbered as the full model, as ComfyUI does); valid layers are -24..-2 (from the end) or 0..22 (from the start)
    """

    depth: int
    numbered: int
    model: str = ""

    @classmethod
    def of(cls, depth: int, released: tuple[str, int] | None = None) -> "LayerNumbering":
        """The numbering of a ``depth``-layer model; one layer short of ``released``
        (``(name, depth)``) counts as that model without its last layer."""
        if released is not None and depth == released[1] - 1:
            return cls(depth, released[1], released[0])
        return cls(depth, depth)

    @property
    def dropped(self) -> int:
        """How many of the released model's last layers the model lacks."""
        return self.numbered - self.depth

    def check(self, layer: object) -> int:
        """ComfyUI's layer index, checked: it must exist in the loaded model.

        Raises:
            LayerError: not an integer, out of range, or a layer the file lacks.
        """
        index = check_layer(layer, self.numbered)
        if index >= self.depth or -self.dropped <= index < 0:
            position = index % self.numbered
            which = "last layer" if position == self.numbered - 1 else f"layer {position}"
            raise LayerError(
                f"layer {layer} is {self.model}'s {which}, which this text encoder "
                f"does not have: its file holds {self.depth} of {self.model}'s {self.numbered} layers "
                "(numbered as the full model, as ComfyUI does); valid layers are "
                f"-{self.numbered}..-{self.dropped + 1} (from the end) or 0..{self.depth - 1} (from the start)")
        return index

    def model_index(self, layer: int) -> int:
        """The loaded model's own index for ComfyUI's (checked) ``layer``; negative stays negative."""
        return layer + self.dropped if layer < 0 else layer

    def numbered_index(self, model_index: int) -> int:
        """ComfyUI's index for the loaded model's own ``model_index`` (the inverse of :meth:`model_index`)."""
        return model_index - self.dropped if model_index < 0 else model_index
