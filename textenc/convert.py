"""Convert CLIP state dicts between key layouts, as data.

The canonical layout is Hugging Face transformers' CLIP (``text_model.*``,
``text_projection.weight``, ``vision_model.*``, ``visual_projection.weight``),
because textenc's modules use those names, quirks included.

Everything here is a table: where encoders live in known files
(:data:`TEXT_PREFIXES`, :data:`VISION_PREFIXES`), how open_clip names map to
HF names (:data:`BLOCK_RENAMES`, :data:`OPEN_CLIP_TEXT_TOP`, ...), and which
named layouts :func:`to_layout` writes (:data:`LAYOUTS`). One small function,
:func:`apply_rules`, applies a table. Below a prefix, keys follow one of three
"inner" layouts: ``"hf"``, ``"hf_flat"`` (HF without the ``text_model.`` /
``vision_model.`` root, as transformers >= 5.6 returns in memory) and
``"open_clip"``.

Converted tensors may be views of the input (q/k/v are row slices of
open_clip's fused ``in_proj_weight``); ``.clone()`` them before saving.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from textenc.errors import CheckpointError

__all__ = [
    "COPY", "TRANSPOSE", "SPLIT_QKV", "KeyRule", "Tower", "TEXT", "VISION",
    "TEXT_PREFIXES", "VISION_PREFIXES", "LAYOUTS", "ConversionResult",
    "tower_rules", "apply_rules", "invert_rules", "to_layout",
    "TextEncoderInfo", "VisionInfo", "detect_text_encoders", "detect_vision",
    "detect_model_kind", "convert_text_state_dict", "convert_vision_state_dict",
    "ShapeMismatch", "KeyReport", "check_keys",
]

COPY, TRANSPOSE, SPLIT_QKV = "copy", "transpose", "split_qkv"


@dataclass(frozen=True)
class KeyRule:
    """Map one source key template to one or more HF key templates.

    ``{n}`` in a template stands for a layer index. ``op`` is :data:`COPY`,
    :data:`TRANSPOSE` (open_clip stores ``x @ proj``, HF a Linear weight) or
    :data:`SPLIT_QKV` (fused rows ``[q; k; v]`` as in
    :class:`torch.nn.MultiheadAttention`'s ``in_proj_weight``).
    """

    source: str
    targets: tuple[str, ...]
    op: str = COPY


# open_clip residual block -> HF encoder layer, shared by both towers.
BLOCK_RENAMES = (
    ("ln_1.weight", "layer_norm1.weight"), ("ln_1.bias", "layer_norm1.bias"),
    ("ln_2.weight", "layer_norm2.weight"), ("ln_2.bias", "layer_norm2.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"), ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"), ("mlp.c_proj.bias", "mlp.fc2.bias"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
)
# Fused q/k/v of nn.MultiheadAttention: rows [0:d]=q, [d:2d]=k, [2d:3d]=v.
BLOCK_QKV = (("attn.in_proj_weight", "weight"), ("attn.in_proj_bias", "bias"))

OPEN_CLIP_TEXT_TOP = (
    KeyRule("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",)),
    KeyRule("positional_embedding", ("text_model.embeddings.position_embedding.weight",)),
    KeyRule("ln_final.weight", ("text_model.final_layer_norm.weight",)),
    KeyRule("ln_final.bias", ("text_model.final_layer_norm.bias",)),
    KeyRule("text_projection", ("text_projection.weight",), TRANSPOSE),
)
OPEN_CLIP_VISION_TOP = (
    KeyRule("conv1.weight", ("vision_model.embeddings.patch_embedding.weight",)),
    KeyRule("class_embedding", ("vision_model.embeddings.class_embedding",)),
    KeyRule("positional_embedding", ("vision_model.embeddings.position_embedding.weight",)),
    # "pre_layrnorm" is HF's own misspelling; textenc keeps it so HF files load as-is.
    KeyRule("ln_pre.weight", ("vision_model.pre_layrnorm.weight",)),
    KeyRule("ln_pre.bias", ("vision_model.pre_layrnorm.bias",)),
    KeyRule("ln_post.weight", ("vision_model.post_layernorm.weight",)),
    KeyRule("ln_post.bias", ("vision_model.post_layernorm.bias",)),
    KeyRule("proj", ("visual_projection.weight",), TRANSPOSE),
)


@dataclass(frozen=True)
class Tower:
    """What sets the text and vision towers apart, as data.

    Attributes:
        name: ``"text"`` or ``"vision"``.
        hf_root: Prefix of HF keys below the model, e.g. ``"text_model."``.
        open_clip_top: Rules for the keys outside the residual blocks.
        markers: Inner layout -> a key that proves it (relative to the prefix).
        dropped: Inner keys that are not weights, dropped on purpose.
        foreign: Inner-key prefixes of the other tower, skipped silently.
    """

    name: str
    hf_root: str
    open_clip_top: tuple[KeyRule, ...]
    markers: tuple[tuple[str, str], ...]
    dropped: tuple[str, ...]
    foreign: tuple[str, ...]


# Not weights: HF's position_ids buffers (arange, recomputed by the model),
# CLIP's contrastive logit_scale (unused for conditioning) and open_clip's
# causal attn_mask buffer (rebuilt at run time).
_DROPPED = ("position_ids", "logit_scale", "attn_mask")

TEXT = Tower(
    name="text",
    hf_root="text_model.",
    open_clip_top=OPEN_CLIP_TEXT_TOP,
    markers=(
        ("hf", "text_model.embeddings.token_embedding.weight"),
        ("hf_flat", "embeddings.token_embedding.weight"),
        ("open_clip", "token_embedding.weight"),
    ),
    dropped=_DROPPED,
    foreign=("vision_model.", "visual_projection.", "visual."),
)
VISION = Tower(
    name="vision",
    hf_root="vision_model.",
    open_clip_top=OPEN_CLIP_VISION_TOP,
    markers=(
        ("hf", "vision_model.embeddings.patch_embedding.weight"),
        ("hf_flat", "embeddings.patch_embedding.weight"),
        ("open_clip", "conv1.weight"),
    ),
    dropped=_DROPPED,
    foreign=("text_model.", "text_projection"),
)

# Where text encoders live: (prefix, encoder name, source model). Encoder name
# "" means "infer from the width". Longer, specific prefixes come first.
TEXT_PREFIXES = (
    ("conditioner.embedders.0.transformer.", "l", "sdxl"),
    ("conditioner.embedders.1.model.", "g", "sdxl"),
    ("conditioner.embedders.0.model.", "g", "sdxl_refiner"),
    ("cond_stage_model.transformer.", "l", "sd1"),
    ("cond_stage_model.model.", "h", "sd2"),
    ("clip_l.transformer.", "l", "comfy"),  # ComfyUI's own saved CLIP files.
    ("clip_g.transformer.", "g", "comfy"),
    ("clip_h.transformer.", "h", "comfy"),
    ("", "", "standalone"),
)
# Where vision towers live: (prefix, source model).
VISION_PREFIXES = (
    ("conditioner.embedders.0.open_clip.model.visual.", "svd"),
    ("embedder.model.visual.", "sd21_unclip"),
    ("cond_stage_model.model.visual.", "sd2"),
    ("visual.", "open_clip"),
    ("", "standalone"),
)

# Named layouts to_layout() writes: name -> (tower, prefix, inner layout).
LAYOUTS: dict[str, tuple[Tower, str, str]] = {
    "hf": (TEXT, "", "hf"),
    "hf_flat": (TEXT, "", "hf_flat"),
    "open_clip": (TEXT, "", "open_clip"),
    "sd1": (TEXT, "cond_stage_model.transformer.", "hf"),
    "sd1_legacy": (TEXT, "cond_stage_model.transformer.", "hf_flat"),
    "sd2": (TEXT, "cond_stage_model.model.", "open_clip"),
    "sdxl_l": (TEXT, "conditioner.embedders.0.transformer.", "hf"),
    "sdxl_g": (TEXT, "conditioner.embedders.1.model.", "open_clip"),
    "sdxl_refiner_g": (TEXT, "conditioner.embedders.0.model.", "open_clip"),
    "comfy_l": (TEXT, "clip_l.transformer.", "hf"),
    "comfy_g": (TEXT, "clip_g.transformer.", "hf"),
    "comfy_h": (TEXT, "clip_h.transformer.", "hf"),
    "hf_vision": (VISION, "", "hf"),
    "hf_vision_flat": (VISION, "", "hf_flat"),
    "open_clip_visual": (VISION, "", "open_clip"),
    "open_clip_full_visual": (VISION, "visual.", "open_clip"),
    "sd21_unclip_visual": (VISION, "embedder.model.visual.", "open_clip"),
    "svd_visual": (VISION, "conditioner.embedders.0.open_clip.model.visual.", "open_clip"),
}


@dataclass(frozen=True)
class ConversionResult:
    """A converted state dict and what did not convert.

    Attributes:
        state_dict: HF-layout keys -> tensors.
        unmatched: Source keys (full names) below the prefix that no rule matched.
        dropped: Source keys dropped on purpose because they are not weights.
    """

    state_dict: dict[str, torch.Tensor]
    unmatched: tuple[str, ...]
    dropped: tuple[str, ...]


def tower_rules(tower: Tower, inner: str) -> tuple[KeyRule, ...]:
    """Rules mapping ``inner``-layout keys of ``tower`` to HF keys.

    >>> [r.targets for r in tower_rules(TEXT, "open_clip") if r.op == SPLIT_QKV][0][0]
    'text_model.encoder.layers.{n}.self_attn.q_proj.weight'
    """
    layer = f"{tower.hf_root}encoder.layers.{{n}}."
    block = [KeyRule(f"transformer.resblocks.{{n}}.{src}", (layer + dst,))
             for src, dst in BLOCK_RENAMES]
    block += [KeyRule(f"transformer.resblocks.{{n}}.{src}",
                      tuple(f"{layer}self_attn.{part}_proj.{kind}" for part in "qkv"),
                      SPLIT_QKV) for src, kind in BLOCK_QKV]
    open_clip = tower.open_clip_top + tuple(block)
    canonical = [target for rule in open_clip for target in rule.targets]
    if inner == "open_clip":
        return open_clip
    if inner == "hf":
        return tuple(KeyRule(key, (key,)) for key in canonical)
    if inner == "hf_flat":
        return tuple(KeyRule(key.removeprefix(tower.hf_root), (key,)) for key in canonical)
    raise CheckpointError(f"unknown inner layout {inner!r}; use hf, hf_flat or open_clip.")


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _template(key: str) -> tuple[str, str]:
    """``"a.3.b"`` -> ``("a.{n}.b", "3")``: the first layer index becomes ``{n}``."""
    match = _LAYER_INDEX.search(key)
    if match is None:
        return key, ""
    return key[: match.start()] + ".{n}." + key[match.end():], match.group(1)


def _split_qkv(key: str, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if tensor.shape[0] % 3 != 0:
        raise CheckpointError(
            f"{key}: fused q/k/v has {tensor.shape[0]} rows, not a multiple of 3; "
            "the checkpoint is malformed."
        )
    return tuple(torch.chunk(tensor, 3, dim=0))


_FORWARD: dict[str, Callable[[str, torch.Tensor], tuple[torch.Tensor, ...]]] = {
    COPY: lambda key, tensor: (tensor,),
    TRANSPOSE: lambda key, tensor: (tensor.t().contiguous(),),
    SPLIT_QKV: _split_qkv,
}
_INVERSE: dict[str, Callable[[list[torch.Tensor]], torch.Tensor]] = {
    COPY: lambda parts: parts[0],
    TRANSPOSE: lambda parts: parts[0].t().contiguous(),
    SPLIT_QKV: lambda parts: torch.cat(parts, dim=0),
}


def apply_rules(
    state_dict: Mapping[str, torch.Tensor],
    rules: tuple[KeyRule, ...],
    *,
    prefix: str = "",
    dropped: tuple[str, ...] = (),
    foreign: tuple[str, ...] = (),
) -> ConversionResult:
    """Apply ``rules`` to the keys below ``prefix``; never mutates the input.

    Args:
        state_dict: Source keys -> tensors.
        rules: Inner key templates -> HF key templates.
        prefix: Only keys starting with it are converted (it is stripped first).
        dropped: Inner keys ending with one of these are dropped as non-weights.
        foreign: Inner keys starting with one of these are skipped silently.

    Returns:
        The HF-layout dict, the unmatched and the dropped source keys.

    >>> rules = (KeyRule("a.{n}.w", ("b.{n}.w",)),)
    >>> apply_rules({"p.a.2.w": torch.ones(1), "p.zz": torch.ones(1)}, rules, prefix="p.")
    ConversionResult(state_dict={'b.2.w': tensor([1.])}, unmatched=('p.zz',), dropped=())
    """
    lookup = {rule.source: rule for rule in rules}
    converted: dict[str, torch.Tensor] = {}
    unmatched, skipped = [], []
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        inner = key[len(prefix):]
        template, index = _template(inner)
        rule = lookup.get(template)
        if rule is not None:
            for target, value in zip(rule.targets, _FORWARD[rule.op](key, tensor)):
                converted[target.replace("{n}", index)] = value
        elif inner.endswith(dropped):
            skipped.append(key)
        elif not (foreign and inner.startswith(foreign)):
            unmatched.append(key)
    return ConversionResult(converted, tuple(unmatched), tuple(skipped))


def invert_rules(
    hf_state_dict: Mapping[str, torch.Tensor], rules: tuple[KeyRule, ...], *, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Write an HF-layout dict back in the rules' source layout, below ``prefix``.

    Raises:
        CheckpointError: A key matches no rule, or a fused q/k/v part is missing.
    """
    by_target = {target: rule for rule in rules for target in rule.targets}
    written: dict[str, torch.Tensor] = {}
    for key in hf_state_dict:
        template, index = _template(key)
        rule = by_target.get(template)
        if rule is None:
            raise CheckpointError(f"{key}: no rule writes this HF key in the requested layout.")
        source = prefix + rule.source.replace("{n}", index)
        if source in written:
            continue
        names = [target.replace("{n}", index) for target in rule.targets]
        missing = [name for name in names if name not in hf_state_dict]
        if missing:
            raise CheckpointError(f"{source}: needs {missing}, which are missing.")
        written[source] = _INVERSE[rule.op]([hf_state_dict[name] for name in names])
    return written


def to_layout(hf_state_dict: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Write an HF-layout text or vision state dict in a named real-world layout.

    Args:
        hf_state_dict: Keys as in ``CLIPTextModelWithProjection`` or
            ``CLIPVisionModelWithProjection`` (``position_ids`` are dropped).
        layout: A name in :data:`LAYOUTS`, e.g. ``"sd2"`` or ``"open_clip_visual"``.

    Returns:
        A new dict; converting it back gives the input exactly.

    Raises:
        CheckpointError: Unknown layout, or keys the layout cannot hold.

    >>> sorted(to_layout({"text_projection.weight": torch.zeros(2, 3)}, "sd2"))
    ['cond_stage_model.model.text_projection']
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; known layouts: {sorted(LAYOUTS)}.")
    tower, prefix, inner = LAYOUTS[layout]
    weights = {key: value for key, value in hf_state_dict.items()
               if not key.endswith(_DROPPED)}
    return invert_rules(weights, tower_rules(tower, inner), prefix=prefix)


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
class TextEncoderInfo:
    """A text encoder found in a state dict, with its config read from shapes.

    ``name`` is ``"l"``, ``"h"``, ``"g"`` or ``"custom"``; ``source`` is the model
    it came from (``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sdxl_refiner"``,
    ``"comfy"``, ``"standalone"``); ``layout`` the inner key layout.
    ``projection_dim`` is ``None`` when there is no ``text_projection``.
    """

    name: str
    prefix: str
    layout: str
    source: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    projection_dim: int | None


@dataclass(frozen=True)
class VisionInfo:
    """A CLIP vision tower found in a state dict, with its config read from shapes.

    ``name`` is ``"vit_l_14"``, ``"vit_l_14_336"``, ``"vit_h_14"``,
    ``"vit_bigg_14"`` or ``"custom"``.
    """

    name: str
    prefix: str
    layout: str
    source: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
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
    return TextEncoderInfo(
        name=found.row[1] or _TEXT_NAMES_BY_WIDTH.get(width, "custom"), prefix=found.prefix,
        layout=found.inner, source=found.row[2], hidden_size=width,
        num_layers=_num_layers(hf, "text_model."), num_heads=max(1, width // 64),
        intermediate_size=intermediate, vocab_size=vocab, max_positions=positions,
        projection_dim=_projection_dim(hf, "text_projection.weight"),
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


def _candidates(
    state_dict: Mapping[str, torch.Tensor], tower: Tower, prefixes: tuple[tuple[str, ...], ...]
) -> list[_Found]:
    """Each ``tower`` found below a prefix of ``prefixes``, converted to HF layout."""
    found = []
    for row in prefixes:
        prefix = row[0]
        for inner, marker in tower.markers:
            if prefix + marker in state_dict:
                result = apply_rules(state_dict, tower_rules(tower, inner), prefix=prefix,
                                     dropped=tower.dropped, foreign=tower.foreign)
                found.append(_Found(prefix, inner, row, result))
                break
    return found


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


# --------------------------------------------------------------------------
# Strict key checking against a model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeMismatch:
    """A key whose tensor shape differs from the model's."""

    key: str
    expected: tuple[int, ...]
    got: tuple[int, ...]


@dataclass(frozen=True)
class KeyReport:
    """How a converted state dict matches a model's keys and shapes."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[ShapeMismatch, ...]

    @property
    def ok(self) -> bool:
        """True when every key is present, expected and of the right shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """All problems, one per line."""
        lines = [f"missing: {key}" for key in self.missing]
        lines += [f"unexpected: {key}" for key in self.unexpected]
        lines += [f"wrong shape: {m.key}: expected {list(m.expected)}, got {list(m.got)}"
                  for m in self.mismatched]
        return "\n".join(lines)


def check_keys(
    expected: Mapping[str, torch.Tensor | torch.Size | tuple[int, ...]],
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    source: object = "state dict",
    ignore_suffixes: tuple[str, ...] = ("position_ids",),
) -> KeyReport:
    """Compare a converted state dict with a model's keys and shapes.

    Args:
        expected: ``model.state_dict()`` or ``{key: shape}``.
        state_dict: The HF-layout dict to load.
        strict: Raise on any problem instead of returning the report.
        source: The file or name, used in the error.
        ignore_suffixes: Keys ending with these (non-weight buffers) are skipped.

    Returns:
        The report (``report.ok`` tells whether all matched).

    Raises:
        CheckpointError: With ``strict=True``, one error listing every missing,
            unexpected and mis-shaped key.

    >>> check_keys({"w": (2, 3)}, {"w": torch.zeros(2, 3)}).ok
    True
    >>> check_keys({"w": (2, 3)}, {"w": torch.zeros(3, 2)}, strict=False).mismatched[0].got
    (3, 2)
    """
    want = {key: tuple(value.shape if isinstance(value, torch.Tensor) else value)
            for key, value in expected.items() if not key.endswith(ignore_suffixes)}
    have = {key: tuple(value.shape) for key, value in state_dict.items()
            if not key.endswith(ignore_suffixes)}
    report = KeyReport(
        missing=tuple(key for key in want if key not in have),
        unexpected=tuple(key for key in have if key not in want),
        mismatched=tuple(ShapeMismatch(key, want[key], have[key])
                         for key in want if key in have and want[key] != have[key]),
    )
    if strict and not report.ok:
        raise CheckpointError(
            f"{source}: weights do not fit the model (is it the right model type "
            f"or a different size?):\n{report.describe()}"
        )
    return report
