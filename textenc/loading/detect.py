"""Detect which CLIP encoders a state dict holds, read their shapes, and convert them.

Built on the key tables of :mod:`textenc.loading.convert`: a candidate prefix and inner
layout is tried per table row, and the shapes of the converted weights give the
config (width, depth, MLP size, vocabulary, positions, projection).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from textenc.loading.convert import (TEXT, TEXT_PREFIXES, VISION, VISION_PREFIXES, ConversionResult, Tower, _template,
                                     apply_rules, tower_rules)
from textenc.errors import CheckpointError

__all__ = ["TextEncoderInfo", "VisionInfo", "LayerReport", "layer_report", "KNOWN_TEXT_DEPTHS", "detect_text_encoders", "detect_vision",
           "find_vision_tower", "convert_tower",
           "detect_model_kind", "convert_text_state_dict", "convert_vision_state_dict"]
# --------------------------------------------------------------------------
# Detection: which encoders a state dict holds, and their shapes
# --------------------------------------------------------------------------

# Released CLIP text encoders all use 64-wide heads (L 768/12, H 1024/16,
# bigG 1280/20); head count is not stored in the weights.
_TEXT_NAMES_BY_WIDTH = {768: "l", 1024: "h", 1280: "g"}
# Vision towers: ViT-L/14 1024/16, ViT-H/14 1280/16, ViT-bigG/14 1664/16.
_VISION_HEADS_BY_WIDTH = {1024: 16, 1280: 16, 1664: 16}
# (width, layers, patch, image size) -> name; 224px/14 = 16x16 patches + 1 class token = 257.
_KNOWN_VISION = {
    (1024, 24, 14, 224): "vit_l_14",
    (1024, 24, 14, 336): "vit_l_14_336",
    (1280, 32, 14, 224): "vit_h_14",
    (1664, 48, 14, 224): "vit_bigg_14",
}


@dataclass(frozen=True)
class _TowerInfo:
    """What every tower found in a state dict has: where it is and its transformer's shapes.

    ``prefix`` is where its keys start, ``layout`` the inner key layout
    (``"hf"``, ``"hf_flat"`` or ``"open_clip"``), ``source`` the model it came from.
    """

    name: str
    prefix: str
    layout: str
    source: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class TextEncoderInfo(_TowerInfo):
    """A text encoder found in a state dict, with its config read from shapes.

    ``name`` is ``"l"``, ``"h"``, ``"g"`` or ``"custom"``; ``source`` is the model
    it came from (``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sdxl_refiner"``,
    ``"comfy"``, ``"standalone"``); ``layout`` the inner key layout.
    ``projection_dim`` is ``None`` when there is no ``text_projection``.
    """

    vocab_size: int
    max_positions: int
    projection_dim: int | None
    missing_layers: tuple[int, ...] = ()
    stray_keys: tuple[str, ...] = ()

    @property
    def expected_layers(self) -> int | None:
        """The depth of the released model (None unless both the role and the width name one)."""
        return KNOWN_TEXT_DEPTHS.get(self.name) if _TEXT_NAMES_BY_WIDTH.get(self.hidden_size) == self.name else None


@dataclass(frozen=True)
class VisionInfo(_TowerInfo):
    """A CLIP vision tower found in a state dict, with its config read from shapes.

    ``name`` is ``"vit_l_14"``, ``"vit_l_14_336"``, ``"vit_h_14"``,
    ``"vit_bigg_14"`` or ``"custom"``.
    """

    patch_size: int
    image_size: int
    num_positions: int
    projection_dim: int | None


def _shape(hf: Mapping[str, torch.Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in hf:
        raise CheckpointError(f"{where}: key {key!r} is missing; the encoder is incomplete.")
    return tuple(hf[key].shape)


def _num_layers(hf: Mapping[str, torch.Tensor], root: str) -> int:
    layers = {_template(key)[1] for key in hf if key.startswith(root + "encoder.layers.")}
    return len(layers)


#: Layer count of each released CLIP text encoder (OpenAI L/14, OpenCLIP ViT-H/14, bigG/14).
KNOWN_TEXT_DEPTHS = {"l": 12, "h": 24, "g": 32}


@dataclass(frozen=True)
class LayerReport:
    """The encoder layers found in an HF-layout state dict.

    ``depth`` is the model depth read from the keys; ``absent`` lists layer
    indices below it (or below the released depth of a known model) that
    have no key at all; ``stray`` holds the keys of layers that cannot be
    part of the model: past a known model's depth, or partial layers past
    the first incomplete one. A stray key's index never sets the depth; a
    partial layer inside the depth is left for the loader to report its
    missing keys.
    """

    depth: int
    absent: tuple[int, ...]
    stray: tuple[str, ...]


def layer_report(hf: Mapping[str, torch.Tensor], expected: int | None = None, tower: Tower = TEXT) -> LayerReport:
    """Count an encoder's layers from the keys that belong to it.

    Args:
        hf: HF-layout keys of one tower.
        expected: the released depth when the model is a known one (12 for
            CLIP-L), else None.

    >>> layer_report({}).depth
    0
    """
    per_layer = [t for rule in tower_rules(tower, "hf") for t in rule.targets if "{n}" in t]
    found: dict[int, set[str]] = {}
    for key in hf:
        template, index = _template(key)
        if index and template in per_layer:
            found.setdefault(int(index), set()).add(key)
    full = {n for n, keys in found.items() if len(keys) == len(per_layer)}
    if expected is not None:
        depth = expected
    else:
        depth = max(full, default=-1) + 1
        depth += depth in found  # a partial layer right after the full ones: a truncated file
    absent = tuple(n for n in range(depth) if n not in found)
    stray = tuple(sorted(k for n, keys in found.items() if n >= depth for k in keys))
    return LayerReport(depth, absent, stray)


def _projection_dim(hf: Mapping[str, torch.Tensor], key: str) -> int | None:
    return int(hf[key].shape[0]) if key in hf else None


@dataclass(frozen=True)
class _Found:
    """A tower found below ``prefix``: its inner layout, prefix-table row and conversion."""

    prefix: str
    inner: str
    row: tuple[str, ...]
    result: ConversionResult


def _text_info(found: _Found) -> TextEncoderInfo:
    hf, where = found.result.state_dict, f"text encoder at prefix {found.prefix!r}"
    vocab, width = _shape(hf, "text_model.embeddings.token_embedding.weight", where)
    positions = _shape(hf, "text_model.embeddings.position_embedding.weight", where)[0]
    intermediate = _shape(hf, "text_model.encoder.layers.0.mlp.fc1.weight", where)[0]
    name = found.row[1] or _TEXT_NAMES_BY_WIDTH.get(width, "custom")
    known = _TEXT_NAMES_BY_WIDTH.get(width) == name
    layers = layer_report(hf, KNOWN_TEXT_DEPTHS.get(name) if known else None)
    return TextEncoderInfo(
        name=name, prefix=found.prefix,
        layout=found.inner, source=found.row[2], hidden_size=width,
        num_layers=layers.depth, num_heads=max(1, width // 64),
        intermediate_size=intermediate, vocab_size=vocab, max_positions=positions,
        projection_dim=_projection_dim(hf, "text_projection.weight"),
        missing_layers=layers.absent, stray_keys=layers.stray,
    )


def _vision_info(found: _Found) -> VisionInfo:
    hf, where = found.result.state_dict, f"vision tower at prefix {found.prefix!r}"
    width, _, patch, _ = _shape(hf, "vision_model.embeddings.patch_embedding.weight", where)
    positions = _shape(hf, "vision_model.embeddings.position_embedding.weight", where)[0]
    intermediate = _shape(hf, "vision_model.encoder.layers.0.mlp.fc1.weight", where)[0]
    layers = _num_layers(hf, "vision_model.")
    image_size = round((positions - 1) ** 0.5) * patch
    return VisionInfo(
        name=_KNOWN_VISION.get((width, layers, patch, image_size), "custom"),
        prefix=found.prefix, layout=found.inner, source=found.row[1], hidden_size=width,
        num_layers=layers, num_heads=_VISION_HEADS_BY_WIDTH.get(width, max(1, width // 64)),
        intermediate_size=intermediate, patch_size=patch, image_size=image_size,
        num_positions=positions, projection_dim=_projection_dim(hf, "visual_projection.weight"),
    )


def convert_tower(
    state_dict: Mapping[str, torch.Tensor], tower: Tower, *, prefix: str, inner: str
) -> ConversionResult:
    """Convert the ``tower`` keys below ``prefix``, written in layout ``inner``, to HF layout.

    Keys of the other tower are skipped; non-weight buffers are reported as dropped.

    >>> convert_tower({"visual.conv1.weight": torch.zeros(1)}, VISION, prefix="visual.",
    ...               inner="open_clip").state_dict
    {'vision_model.embeddings.patch_embedding.weight': tensor([0.])}
    """
    return apply_rules(state_dict, tower_rules(tower, inner), prefix=prefix,
                       dropped=tower.dropped, foreign=tower.foreign)


def _locations(
    state_dict: Mapping[str, torch.Tensor], tower: Tower, prefixes: tuple[tuple[str, ...], ...]
) -> list[tuple[tuple[str, ...], str]]:
    """``(prefix-table row, inner layout)`` of each ``tower`` found, without converting."""
    found = []
    for row in prefixes:
        inner = next((inner for inner, marker in tower.markers if row[0] + marker in state_dict),
                     None)
        if inner is not None:
            found.append((row, inner))
    return found


def _candidates(
    state_dict: Mapping[str, torch.Tensor], tower: Tower, prefixes: tuple[tuple[str, ...], ...]
) -> list[_Found]:
    """Each ``tower`` found below a prefix of ``prefixes``, converted to HF layout."""
    return [_Found(row[0], inner, row, convert_tower(state_dict, tower, prefix=row[0], inner=inner))
            for row, inner in _locations(state_dict, tower, prefixes)]


def find_vision_tower(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """``(prefix, inner layout)`` of the first CLIP vision tower found, or None.

    Prefixes are tried in :data:`~textenc.loading.convert.VISION_PREFIXES` order; nothing is converted.

    >>> find_vision_tower({"visual.conv1.weight": torch.zeros(1)})
    ('visual.', 'open_clip')
    """
    found = _locations(state_dict, VISION, VISION_PREFIXES)
    return (found[0][0][0], found[0][1]) if found else None


def _text_found(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[TextEncoderInfo, ConversionResult]]:
    return [(_text_info(found), found.result) for found in _candidates(state_dict, TEXT, TEXT_PREFIXES)]


def _sample_keys(state_dict: Mapping[str, torch.Tensor]) -> str:
    keys = list(state_dict)
    return f"{keys[:6]}{' ...' if len(keys) > 6 else ''} ({len(keys)} keys)"


def detect_text_encoders(state_dict: Mapping[str, torch.Tensor]) -> list[TextEncoderInfo]:
    """List the CLIP text encoders in a state dict (empty when there is none).

    >>> detect_text_encoders({"unet.weight": torch.zeros(1)})
    []
    """
    return [info for info, _ in _text_found(state_dict)]


def detect_vision(state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict") -> VisionInfo:
    """Find the CLIP vision tower in a state dict and read its config from shapes.

    Raises:
        CheckpointError: There is no CLIP vision tower; the message lists some keys.
    """
    return _vision_found(state_dict, source)[0]


def _vision_found(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[VisionInfo, ConversionResult]:
    found = _candidates(state_dict, VISION, VISION_PREFIXES)
    if not found:
        raise CheckpointError(
            f"{source}: not a CLIP vision model (no patch embedding in HF or "
            f"open_clip names under {[row[0] for row in VISION_PREFIXES]}); "
            f"keys found: {_sample_keys(state_dict)}."
        )
    return _vision_info(found[0]), found[0].result


def detect_model_kind(state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict") -> str:
    """Say what a checkpoint is: ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sdxl_refiner"``,
    or ``"standalone_<names>"`` (e.g. ``"standalone_l"``, ``"standalone_l_g"``).

    Raises:
        CheckpointError: No CLIP text encoder was found.
    """
    infos = detect_text_encoders(state_dict)
    if not infos:
        raise CheckpointError(f"{source}: no CLIP text encoder found; keys: {_sample_keys(state_dict)}.")
    sources = {info.source for info in infos}
    for kind in ("sdxl", "sdxl_refiner", "sd1", "sd2"):
        if kind in sources:
            return kind
    return "standalone_" + "_".join(info.name for info in infos)


def convert_text_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, encoder: str | None = None, source: str = "state dict"
) -> ConversionResult:
    """Convert one text encoder of any known layout to HF layout.

    Args:
        state_dict: A full checkpoint or a standalone text encoder.
        encoder: ``"l"``, ``"h"``, ``"g"`` or ``"custom"``; needed when several are present.
        source: The file name, used in errors.

    Raises:
        CheckpointError: None found, the named one is absent, or several and none named.
    """
    everything = _text_found(state_dict)
    names = [info.name for info, _ in everything]
    found = [result for info, result in everything if encoder in (None, info.name)]
    if not found:
        wanted = "CLIP text encoder" if encoder is None else f"text encoder {encoder!r}"
        raise CheckpointError(
            f"{source}: no {wanted} found (found {names}); keys: {_sample_keys(state_dict)}."
        )
    if len(found) > 1:
        raise CheckpointError(f"{source}: holds text encoders {names}; pass encoder= one of them.")
    return found[0]


def convert_vision_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict"
) -> ConversionResult:
    """Convert the CLIP vision tower of any known layout to HF layout.

    Raises:
        CheckpointError: Not a CLIP vision model.
    """
    return _vision_found(state_dict, source)[1]
