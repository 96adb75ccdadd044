"""The families' names and roles as plain data, for what must not import torch: command-line
parsers (``--clip-type`` choices) and node menus (the loaders' ``type`` lists).

The registry (:mod:`textenc.text_encoders.families`) is the truth; importing it builds the
model classes (torch). tests/test_family_names.py checks these tables equal it, so a
family added there without a line here fails a test instead of going missing from the
entry points.

>>> CLIP_TYPES[:3]
('sd1', 'sd2', 'sdxl')
>>> families_with_parts(3)
('sd3',)
"""

from __future__ import annotations

__all__ = ["CLIP_TYPES", "ROLES", "CLIP_TYPE_HELP", "families_with_parts"]

#: Every registered family's name (``clip_type``), in registration order.
CLIP_TYPES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "sd3", "flux", "wan")

#: Each family's roles (the keys of its tokens), in the order they are built.
ROLES: dict[str, tuple[str, ...]] = {
    "sd1": ("l",), "sd2": ("h",), "sdxl": ("l", "g"), "sd3": ("l", "g", "t5xxl"),
    "flux": ("l", "t5xxl"), "wan": ("umt5xxl",),
}

#: What ``clip_type`` means wherever it is taken (``load_clip``, ``textenc encode`` /
#: ``inspect`` / ``encode-dataset --clip-type``, the node loaders' ``type``).
CLIP_TYPE_HELP = ("model family: auto detects it from the weights (SD1, SD2, SDXL; a clip_l + T5 pair is "
                  "Flux, an SD3 checkpoint with text_encoders.* keys is SD3); sd3 takes any of clip_l, "
                  "clip_g and a T5-XXL file, flux clip_l and a T5-XXL file, wan a UMT5-XXL file "
                  "(fp16/bf16, fp8 scaled or GGUF)")


def families_with_parts(count: int) -> tuple[str, ...]:
    """The families of at least ``count`` roles, in registration order (what a loader
    node with ``count`` file inputs can load).

    >>> families_with_parts(2)
    ('sdxl', 'sd3', 'flux')
    """
    return tuple(name for name in CLIP_TYPES if len(ROLES[name]) >= count)
