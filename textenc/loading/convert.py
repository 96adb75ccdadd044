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
    ("text_encoders.clip_l.transformer.", "l", "sd3"),  # single-file SD3 / SD3.5 / Flux checkpoints
    ("text_encoders.clip_g.transformer.", "g", "sd3"),
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
    "sd3_l": (TEXT, "text_encoders.clip_l.transformer.", "hf"),
    "sd3_g": (TEXT, "text_encoders.clip_g.transformer.", "hf"),
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
