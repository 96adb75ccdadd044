"""The text-encoder families (SD1, SD2, SDXL, SD3, Flux, Wan): one :class:`Family` entry each.

A family is one module plus one entry here, as ComfyUI's ``ClipTarget`` /
``supported_models`` and timm's ``register_model``: the family module
(:mod:`~textenc.text_encoders.sd1_clip`, ...) defines its classes and calls
:func:`register_family`. Code that needs a family fact (its roles, classes,
default layers, diffusers names) asks the registry, never ``if clip_type == ...``.

This module only holds the entries. Ask through :mod:`textenc.text_encoders.families`,
which imports the built-in family modules first, so the registry is complete
whenever it is asked.

>>> role = Role("l", model_class=object, tokenizer_class=object)
>>> role.attribute, role.encoder
('clip_l', 'l')
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from ..errors import CheckpointError, ConfigError

__all__ = ["UNEQUAL_LENGTHS", "Role", "Family", "register_family", "unregister_family", "get_family", "families",
           "family_names", "family_for_encoders"]


#: The values of :attr:`Family.unequal_lengths`.
UNEQUAL_LENGTHS = ("repeat", "keep", "refuse")


@dataclasses.dataclass(frozen=True)
class Role:
    """One text encoder of a family, named as its tokens are keyed (``"l"``, ``"g"``, ``"h"``).

    Attributes:
        name: the role; the key of its tokens (``{"l": windows}``) and of
            the family wrappers' ``encoders`` / ``tokenizers`` mappings.
        model_class: its ``SDClipModel`` class (SDXL's ``l``: ``SDClipModel``).
        tokenizer_class: its ``SDTokenizer`` class.
        encoder: the encoder kind checkpoint detection names
            (:func:`textenc.loading.detect.detect_text_encoders`: ``"l"``, ``"h"``,
            ``"g"``) that fills this role; default: the role's name.
        activation: the ``hidden_act`` of a text config read from a checkpoint's
            shapes, which cannot tell it (OpenAI's CLIP-L: ``quick_gelu``;
            OpenCLIP's ViT-H and bigG: ``gelu``, their published configs).
        pad_token: the ``pad_token_id`` of such a config.
        diffusers_text_encoder / diffusers_tokenizer: the diffusers pipeline's
            attribute (and folder) of this role's text encoder and tokenizer.
        attribute_name: the wrappers' attribute and state-dict prefix when it is not
            ``clip_<name>`` (ComfyUI's ``t5xxl``, ``umt5xxl``).
        min_length: the family's minimum token count of a T5 role (SD3 77, Flux 256,
            Wan 512: its prompts are one sequence of at least this length); None for
            CLIP roles (77-token windows). ``activation`` and ``pad_token`` are CLIP's
            and mean nothing for a T5 role.
    """

    name: str
    model_class: type
    tokenizer_class: type
    encoder: str = ""
    activation: str = "quick_gelu"
    pad_token: int = 49407
    diffusers_text_encoder: str = "text_encoder"
    diffusers_tokenizer: str = "tokenizer"
    attribute_name: str = ""
    min_length: int | None = None

    def __post_init__(self) -> None:
        if not self.encoder:
            object.__setattr__(self, "encoder", self.name)

    @property
    def attribute(self) -> str:
        """The wrappers' attribute and state-dict prefix, as ComfyUI's (``clip_l``, ``t5xxl``)."""
        return self.attribute_name or f"clip_{self.name}"

    @property
    def is_t5(self) -> bool:
        """Whether this role is a T5 / UMT5 encoder (one sequence, no pooled output)."""
        return self.min_length is not None

    @property
    def released_model(self) -> tuple[str, int] | None:
        """``(name, depth)`` of the released model a file one layer short of it is
        numbered as (SD2's ``("ViT-H", 24)``: diffusers' 23-layer file); None: none."""
        return getattr(self.model_class, "released_model", None)


@dataclasses.dataclass(frozen=True)
class Family:
    """A text-encoder family: its roles, wrapper classes, layers and pipeline names.

    Attributes:
        name: the ``clip_type`` (``"sd1"``).
        label: its name in messages (``"SD1"``).
        roles: its :class:`Role` entries, in the order they are built and
            concatenated (SDXL: ``l`` then ``g``).
        model_class / tokenizer_class: the wrappers (``SD1ClipModel``, ...): they
            hold ``encoders`` / ``tokenizers`` by role and build from per-role
            arguments (``for_roles``).
        comfy_default_layer: the layer ComfyUI encodes with by default, in its
            numbering (SD1 -1, SD2 and SDXL -2).
        diffusers_default_layer: the layer a diffusers pipeline encodes with
            when ``clip_skip`` is None (diffusers 0.42: SD1/SD2 -1, SDXL -2).
        pipeline_prefix: diffusers pipeline classes ``<prefix>*Pipeline`` are of
            this family (the longest matching prefix wins; families sharing one
            are told apart by the first role's ``activation``).
        diffusers_pooled: the pipeline takes ``pooled_prompt_embeds``.
        checkpoint_layouts: the key layouts of its full checkpoints
            (:data:`textenc.loading.convert.TEXT_PREFIXES`).
        partial: any non-empty subset of its roles may be loaded (SD3, as ComfyUI:
            a missing encoder's part of the result is zeros); otherwise all are needed.
        unequal_lengths: what :func:`textenc.diffusers.to_diffusers` does with a positive and a
            negative cond of different lengths (:data:`UNEQUAL_LENGTHS`): ``"repeat"`` both to
            the least common multiple of the lengths (ComfyUI's ``CONDCrossAttn`` for UNet
            cross-attention, where repeated keys leave the softmax unchanged: SD1/SD2/SDXL);
            ``"keep"`` each at its own length (ComfyUI's ``CONDRegular`` samples conds of
            different shapes separately, and the pipeline runs the negative in a pass of its
            own: Flux, Wan); ``"refuse"`` (``CONDRegular``, but the pipeline batches positive
            and negative in one tensor and joint attention has no text mask, so no padding
            keeps ComfyUI's result: SD3).
    """

    name: str
    label: str
    roles: tuple[Role, ...]
    model_class: type
    tokenizer_class: type
    comfy_default_layer: int = -1
    diffusers_default_layer: int = -1
    pipeline_prefix: str | None = None
    diffusers_pooled: bool = False
    checkpoint_layouts: tuple[str, ...] = ()
    partial: bool = False
    unequal_lengths: str = "repeat"

    def __post_init__(self) -> None:
        if self.unequal_lengths not in UNEQUAL_LENGTHS:
            raise ConfigError(f"family {self.name!r}: unequal_lengths={self.unequal_lengths!r} is not one of "
                              f"{UNEQUAL_LENGTHS}")

    @property
    def role_names(self) -> tuple[str, ...]:
        return tuple(role.name for role in self.roles)

    @property
    def encoder_kinds(self) -> tuple[str, ...]:
        """The detected encoder kinds its roles take, in role order."""
        return tuple(role.encoder for role in self.roles)

    def role(self, name: str) -> Role:
        """The role called ``name``.

        Raises:
            ConfigError: the family has no such role.
        """
        for role in self.roles:
            if role.name == name:
                return role
        raise ConfigError(f"{self.label} has no role {name!r}; its roles are {self.role_names}")


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` (a family module calls this once, at import).

    Raises:
        ConfigError: a family of that name is registered already, or two roles share a name.
    """
    if family.name in _FAMILIES:
        raise ConfigError(f"text-encoder family {family.name!r} is registered already")
    if len(set(family.role_names)) != len(family.roles) or not family.roles:
        raise ConfigError(f"family {family.name!r}: roles must be one or more distinct names, "
                         f"got {family.role_names}")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove the family ``name`` (tests add toy families and take them away again)."""
    _FAMILIES.pop(name, None)


def get_family(name: str) -> Family:
    """The registered family ``name``.

    Raises:
        CheckpointError: no such family (names the registered ones).
    """
    family = _FAMILIES.get(name)
    if family is None:
        raise CheckpointError(f"clip_type {name!r} is not one of {family_names()} or 'auto'")
    return family


def families() -> Iterator[Family]:
    """The registered families, in registration order."""
    return iter(list(_FAMILIES.values()))


def family_names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def family_for_encoders(kinds: Sequence[str]) -> Family:
    """The first registered family whose roles take exactly the detected encoder ``kinds``.

    Raises:
        CheckpointError: no family does (names what each would need).
    """
    found = set(kinds)
    seen: list[tuple[str, ...]] = []
    expected = []
    for family in _FAMILIES.values():
        if set(family.encoder_kinds) == found:
            return family
        if family.encoder_kinds not in seen:
            seen.append(family.encoder_kinds)
            expected.append(f"{'+'.join(k.upper() for k in family.encoder_kinds)} ({family.label})")
    listed = ", ".join(expected[:-1]) + f" or {expected[-1]}" if len(expected) > 1 else "".join(expected)
    raise CheckpointError(f"cannot tell the model type from text encoders {sorted(found)}: "
                          f"expected {listed}; pass clip_type explicitly")
