"""Which family a set of found text encoders makes, and what each role is built from.

:func:`detect_family` picks the family without ``clip_type``: a full checkpoint's key
layout decides first (a single-file SD3 checkpoint's ``text_encoders.clip_l/clip_g``
prefixes are SD3 even without T5; with CLIP-L and T5 alone the same layout is Flux's),
then the set of encoder kinds (:func:`~textenc.text_encoders.registry.family_for_encoders`:
L → SD1, H → SD2, L+G → SDXL, L+G+T5 → SD3, L+T5 → Flux, UMT5 → Wan).
:func:`check_family` refuses encoders an asked-for family does not take.
:func:`role_config` and :func:`tokenizer_arguments` give each role's text config and
tokenizer arguments.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import CheckpointError
from ..loading.text_encoders import FoundTextEncoder, describe_kind, text_config_from_info
from ..nn.t5_config import t5_config_from_state_dict
from .families import Family, Role, families, family_for_encoders

__all__ = ["detect_family", "check_family", "role_config", "tokenizer_arguments"]


def _takes(family: Family, kinds: set[str]) -> bool:
    wanted = set(family.encoder_kinds)
    return kinds == wanted or (family.partial and bool(kinds) and kinds <= wanted)


def detect_family(encoders: Mapping[str, FoundTextEncoder]) -> Family:
    """The family the found encoders (by kind) make; see the module docstring.

    Raises:
        CheckpointError: no family takes them (names what each family needs).
    """
    kinds = set(encoders)
    layouts = {found.info.source for found in encoders.values() if not found.is_t5}
    fits = [family for family in families()
            if layouts & set(family.checkpoint_layouts) and _takes(family, kinds)]
    exact = [family for family in fits if set(family.encoder_kinds) == kinds]
    if len(fits) == 1 or exact:
        return exact[0] if exact else fits[0]
    return family_for_encoders(list(encoders))


def check_family(family: Family, encoders: Mapping[str, FoundTextEncoder], clip_type: str) -> Family:
    """``family`` when it takes the found encoders: none it lacks a role for, and all its roles
    unless it may be loaded in part (SD3).

    Raises:
        CheckpointError: naming the file of each encoder it does not take (and the family
            those files make), or the encoders missing.
    """
    wanted = family.encoder_kinds
    named = " + ".join(describe_kind(kind) for kind in wanted)
    extra = [kind for kind in encoders if kind not in wanted]
    if extra:
        held = ", ".join(f"{encoders[kind].source} holds {describe_kind(kind)}" for kind in extra)
        try:
            other = detect_family(encoders)
            hint = f"; those files make {other.label}: pass clip_type={other.name!r}"
        except CheckpointError:
            hint = ""
        raise CheckpointError(f"clip_type {clip_type!r} ({family.label}) takes {named}, but {held}{hint}")
    missing = [kind for kind in wanted if kind not in encoders]
    if missing and not _takes(family, set(encoders)):
        raise CheckpointError(f"clip_type {clip_type!r} ({family.label}) needs {named}; "
                              f"missing {', '.join(describe_kind(kind) for kind in missing)}: give its file too")
    return family


def role_config(role: Role, found: FoundTextEncoder, text_configs: Mapping[str, Any]) -> Any:
    """The role's text config: the caller's, else read from the weights' shapes (CLIP's with the
    role's activation and pad token, which shapes cannot tell)."""
    if role.name in text_configs:
        return text_configs[role.name]
    if found.is_t5:
        return t5_config_from_state_dict(found.state_dict)
    return text_config_from_info(found.info, hidden_act=role.activation, pad_token_id=role.pad_token)


def tokenizer_arguments(role: Role, found: FoundTextEncoder | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """The role's tokenizer arguments: CLIP's embedding width; a UMT5 file's own SentencePiece
    model as ``tokenizer`` (unless ``given`` has one).

    Raises:
        CheckpointError: a UMT5 file without ``spiece_model`` and no tokenizer given.
    """
    arguments = dict(given)
    if found is None:
        return arguments
    if not found.is_t5:
        return {"embedding_size": found.info.hidden_size, **arguments}
    if found.info.kind == "umt5" and "tokenizer" not in arguments:
        if found.spiece_model is None:
            raise CheckpointError(
                f"{found.source}: this UMT5 text encoder holds no 'spiece_model' (its SentencePiece tokenizer, which "
                f"Wan's umt5_xxl files carry) and none was given; pass tokenizer_kwargs={{{role.name!r}: "
                "{'tokenizer': 'path/to/spiece.model'}} or use a file that includes it")
        arguments["tokenizer"] = found.spiece_model
    return arguments
