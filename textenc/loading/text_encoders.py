"""Find the CLIP text encoders in checkpoint state dicts, one per role, ready to build.

:func:`load_text_encoder_state_dicts` reads ``(source, state_dict)`` pairs: each
encoder found (:func:`textenc.loading.detect.detect_text_encoders`) is converted to the
HF layout, checked for missing layers and stray keys, and keyed by the encoder kind it is
(``l``, ``h``, ``g``). :func:`text_config_from_info` gives the text config its shapes imply.
Which family the encoders make, and its facts, are the family registry's
(:mod:`textenc.text_encoders.families`); :func:`textenc.sd.load_clip` passes them in
and builds a ``CLIP`` from the result.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from .detect import TextEncoderInfo, convert_text_state_dict, detect_text_encoders
from ..errors import CheckpointError, CheckpointWarning
from ..warn import warn_at_caller

__all__ = ["FoundTextEncoder", "load_text_encoder_state_dicts", "text_config_from_info"]


def text_config_from_info(info: TextEncoderInfo, *, hidden_act: str = "quick_gelu",
                          pad_token_id: int = 49407) -> dict[str, Any]:
    """A text config dict built from the shapes a checkpoint actually has.

    Shapes cannot tell the head count of a non-standard width (it is read as
    width / 64, CLIP's head size) nor the activation and pad token (the family's
    role gives them: quick_gelu for L, gelu for H and G); pass ``text_configs`` to
    :func:`~textenc.sd.load_clip` for such models.
    """
    return {"vocab_size": info.vocab_size, "hidden_size": info.hidden_size,
            "intermediate_size": info.intermediate_size, "num_hidden_layers": info.num_layers,
            "num_attention_heads": info.num_heads, "max_position_embeddings": info.max_positions,
            "hidden_act": hidden_act, "layer_norm_eps": 1e-5,
            "projection_dim": info.projection_dim or info.hidden_size,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": pad_token_id}


@dataclasses.dataclass(frozen=True)
class FoundTextEncoder:
    """One text encoder found in a checkpoint: what :func:`load_text_encoder_state_dicts` returns per role.

    ``info`` is its detection report (shapes, depth), ``state_dict`` its weights in
    the HF layout (stray keys dropped), ``source`` the file (or name) it came from.
    """

    info: TextEncoderInfo
    state_dict: dict
    source: str


def _role(info: TextEncoderInfo, roles: Sequence[str] | None, taken: Mapping[str, Any]) -> str:
    if info.name in ("l", "h", "g"):
        return info.name
    # Non-standard widths (tiny test models, custom finetunes). Every known prefix
    # names its encoder (convert.TEXT_PREFIXES), so these are standalone files:
    # the requested family's roles, in the order of the files (SDXL: L first), decide.
    if not roles:
        return "l"
    return next((role for role in roles if role not in taken), roles[-1])


def _check_layers(source: str, info: TextEncoderInfo, allow_missing_layers: bool,
                  released_depths: Mapping[str, int]) -> TextEncoderInfo:
    """Refuse missing layers; with ``allow_missing_layers``, a known model truncated at the end
    becomes a shallower model (a gap is always refused)."""
    missing = list(info.missing_layers)
    if not missing:
        return info
    truncated = missing == list(range(missing[0], info.num_layers)) and missing[0] > 0
    released = released_depths.get(info.name)
    if released is not None and missing == [released - 1]:
        # diffusers' SD2 text encoder: ViT-H without the last layer, which SD2 never uses.
        # ComfyUI loads it too; SD2ClipHModel numbers it as ViT-H (its default -2 is this file's last).
        return dataclasses.replace(info, num_layers=missing[0], missing_layers=())
    if allow_missing_layers and truncated and info.expected_layers is not None:
        return dataclasses.replace(info, num_layers=missing[0], missing_layers=())
    depth = (f"CLIP-{info.name.upper()} has {info.expected_layers} layers" if info.expected_layers
             else f"the keys name {info.num_layers} layers")
    hint = " (allow_missing_layers=True loads it as a shallower model)" if truncated and info.expected_layers else ""
    raise CheckpointError(f"{source}: text encoder {info.name!r} is missing layer(s) {missing} ({depth}); "
                          f"the file is truncated or was pruned; use a complete copy{hint}")


def _stray_keys(source: str, info: TextEncoderInfo, unmatched: Sequence[str], strict: bool) -> None:
    """Keys that belong to no known weight: refused when ``strict``, else a warning (as ComfyUI)."""
    stray = list(unmatched) + list(info.stray_keys)
    if not stray:
        return
    message = (f"{source}: text encoder {info.name!r} has {len(stray)} unexpected key(s): {stray[:8]}; "
               "they belong to no known weight (a bad merge or an extra tensor)")
    if strict:
        raise CheckpointError(message + "; strict=False loads the file without them")
    warn_at_caller(message + "; they were ignored (strict=True refuses such files)", CheckpointWarning)


def load_text_encoder_state_dicts(state_dicts: Sequence[tuple[str, Mapping]], *,
                                  roles: Sequence[str] | None = None, strict: bool = False,
                                  allow_missing_layers: bool = False,
                                  released_depths: Mapping[str, int] | None = None) -> dict[str, FoundTextEncoder]:
    """Find every text encoder in the given ``(source, state_dict)`` pairs, keyed by encoder kind.

    Args:
        roles: the encoder kinds the requested family takes, in order (SDXL ``("l", "g")``):
            encoders of non-standard width take the first one not yet found, file by
            file; None: ``"l"``.
        released_depths: kind → the released model's depth, for kinds whose files may
            lack that model's last layer and load anyway (``{"h": 24}``: diffusers'
            23-layer SD2 ViT-H, numbered as the full model).

    Raises:
        CheckpointError: no encoder, two of one role, missing layers (see
            :func:`~textenc.sd.load_clip`), or (``strict``) keys below an encoder's prefix
            that match no known weight.

    Warns:
        CheckpointWarning: (not ``strict``) such keys, which are ignored.
    """
    found: dict[str, FoundTextEncoder] = {}
    for source, sd in state_dicts:
        infos = detect_text_encoders(sd)
        if not infos:
            raise CheckpointError(f"{source}: no CLIP text encoder found")
        for info in infos:
            result = convert_text_state_dict(sd, encoder=info.name, source=source)
            info = _check_layers(source, info, allow_missing_layers, released_depths or {})
            _stray_keys(source, info, result.unmatched, strict)
            converted = {k: v for k, v in result.state_dict.items() if k not in set(info.stray_keys)}
            role = _role(info, roles, found)
            if role in found:
                raise CheckpointError(f"{source}: a second {role!r} text encoder "
                                      f"(first from {found[role].source})")
            found[role] = FoundTextEncoder(info, converted, source)
    return found
