"""Find the CLIP text encoders in checkpoint state dicts, one per role, ready to build.

:func:`load_text_encoder_state_dicts` reads ``(source, state_dict)`` pairs: each
encoder found (:func:`textenc.loading.detect.detect_text_encoders`) is converted to the
HF layout, checked for missing layers and stray keys, and given its role
(:data:`ROLES`: ``l`` for SD1, ``h`` for SD2, ``l`` + ``g`` for SDXL).
:func:`text_config_from_info` gives the text config its shapes imply.
:mod:`textenc.sd` builds a ``CLIP`` from the result (:func:`textenc.sd.load_clip`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from .detect import KNOWN_TEXT_DEPTHS, TextEncoderInfo, convert_text_state_dict, detect_text_encoders
from ..errors import CheckpointError, CheckpointWarning
from ..warn import warn_at_caller

__all__ = ["CLIP_TYPES", "ROLES", "FoundTextEncoder", "load_text_encoder_state_dicts",
           "text_config_from_info", "detect_clip_type"]

CLIP_TYPES = ("sd1", "sd2", "sdxl")
#: The text-encoder roles of each model type, in the order they are built.
ROLES = {"sd1": ("l",), "sd2": ("h",), "sdxl": ("l", "g")}
# Shapes cannot tell the activation: OpenAI's CLIP-L uses quick_gelu, OpenCLIP's
# ViT-H and bigG use exact gelu (their published configs).
DEFAULT_ACTIVATION = {"l": "quick_gelu", "h": "gelu", "g": "gelu"}


def text_config_from_info(info: TextEncoderInfo, *, role: str | None = None,
                          hidden_act: str | None = None, pad_token_id: int = 49407) -> dict[str, Any]:
    """A text config dict built from the shapes a checkpoint actually has.

    Shapes cannot tell the head count of a non-standard width (it is read as
    width / 64, CLIP's head size) nor the activation (taken from the role:
    quick_gelu for L, gelu for H and G); pass ``text_configs`` to
    :func:`~textenc.sd.load_clip` for such models.
    """
    return {"vocab_size": info.vocab_size, "hidden_size": info.hidden_size,
            "intermediate_size": info.intermediate_size, "num_hidden_layers": info.num_layers,
            "num_attention_heads": info.num_heads, "max_position_embeddings": info.max_positions,
            "hidden_act": hidden_act or DEFAULT_ACTIVATION.get(role or info.name, "quick_gelu"),
            "layer_norm_eps": 1e-5, "projection_dim": info.projection_dim or info.hidden_size,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": pad_token_id}


def detect_clip_type(names: Sequence[str]) -> str:
    """``"sd1"`` for L alone, ``"sd2"`` for H alone, ``"sdxl"`` for L + G."""
    found = set(names)
    if found == {"l"}:
        return "sd1"
    if found == {"h"}:
        return "sd2"
    if found == {"l", "g"}:
        return "sdxl"
    raise CheckpointError(f"cannot tell the model type from text encoders {sorted(found)}: "
                          "expected L (SD1), H (SD2) or L+G (SDXL); pass clip_type explicitly")


@dataclasses.dataclass(frozen=True)
class FoundTextEncoder:
    """One text encoder found in a checkpoint: what :func:`load_text_encoder_state_dicts` returns per role.

    ``info`` is its detection report (shapes, depth), ``state_dict`` its weights in
    the HF layout (stray keys dropped), ``source`` the file (or name) it came from.
    """

    info: TextEncoderInfo
    state_dict: dict
    source: str


def _role(info: TextEncoderInfo, clip_type: str | None, taken: Mapping[str, Any]) -> str:
    if info.name in ("l", "h", "g"):
        return info.name
    # Non-standard widths (tiny test models, custom finetunes). Every known prefix
    # names its encoder (convert.TEXT_PREFIXES), so these are standalone files:
    # the requested type, or the order of the files for SDXL (L first), decides.
    if clip_type == "sd2":
        return "h"
    if clip_type == "sdxl" and "l" in taken:
        return "g"
    return "l"


def _check_layers(source: str, info: TextEncoderInfo, allow_missing_layers: bool) -> TextEncoderInfo:
    """Refuse missing layers; with ``allow_missing_layers``, a known model truncated at the end
    becomes a shallower model (a gap is always refused)."""
    missing = list(info.missing_layers)
    if not missing:
        return info
    truncated = missing == list(range(missing[0], info.num_layers)) and missing[0] > 0
    if info.name == "h" and missing == [KNOWN_TEXT_DEPTHS["h"] - 1]:
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
                                  clip_type: str | None = None, strict: bool = False,
                                  allow_missing_layers: bool = False) -> dict[str, FoundTextEncoder]:
    """Find every text encoder in the given ``(source, state_dict)`` pairs, keyed by role.

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
            info = _check_layers(source, info, allow_missing_layers)
            _stray_keys(source, info, result.unmatched, strict)
            converted = {k: v for k, v in result.state_dict.items() if k not in set(info.stray_keys)}
            role = _role(info, clip_type, found)
            if role in found:
                raise CheckpointError(f"{source}: a second {role!r} text encoder "
                                      f"(first from {found[role].source})")
            found[role] = FoundTextEncoder(info, converted, source)
    return found
