"""Find the text encoders (CLIP, T5, UMT5) in checkpoint files, one per role, ready to build.

:func:`load_text_encoder_state_dicts` reads ``(source, state_dict)`` pairs: each CLIP
encoder found (:func:`textenc.loading.detect.detect_text_encoders`) is converted to the
HF layout, checked for missing layers and stray keys, and keyed by the encoder kind it is
(``l``, ``h``, ``g``); a T5 encoder (:func:`textenc.loading.t5_files.t5_checkpoint`, any
prefix) is keyed ``t5`` (T5 v1.1) or ``umt5``. :func:`load_text_encoder_files` reads
paths, T5's GGUF files and diffusers folders included. :func:`text_config_from_info` gives the text config its shapes imply.
Which family the encoders make, and its facts, are the family registry's
(:mod:`textenc.text_encoders.families`); :func:`textenc.sd.load_clip` passes them in
and builds a ``CLIP`` from the result.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from .checkpoint import load_state_dict, read_safetensors_metadata
from .detect import TextEncoderInfo, convert_text_state_dict, detect_text_encoders
from .t5_files import T5Checkpoint, T5Shapes, load_t5_file, t5_checkpoint
from ..errors import CheckpointError, CheckpointWarning
from ..warn import warn_at_caller

__all__ = ["FoundTextEncoder", "load_text_encoder_state_dicts", "load_text_encoder_files",
           "text_config_from_info", "T5_KINDS", "describe_kind"]

#: The encoder kinds of T5 files: T5 v1.1 (SD3, Flux) and UMT5 (Wan).
T5_KINDS = ("t5", "umt5")
_KIND_NAMES = {"l": "CLIP-L", "h": "CLIP-H (OpenCLIP ViT-H)", "g": "CLIP-G (OpenCLIP ViT-bigG)",
               "t5": "T5-XXL (T5 v1.1)", "umt5": "UMT5-XXL"}
_T5_MARKER = "encoder.final_layer_norm.weight"
#: ``(source, state_dict)``, ``(source, state_dict, safetensors metadata)`` or a T5 file already read.
Entry = Union[tuple, T5Checkpoint]


def describe_kind(kind: str) -> str:
    """A user-facing name of an encoder kind (``"t5"`` → ``"T5-XXL (T5 v1.1)"``)."""
    return _KIND_NAMES.get(kind, kind)


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

    ``info`` is its detection report (a CLIP's :class:`TextEncoderInfo`, a T5's
    :class:`~textenc.loading.t5_files.T5Shapes`), ``state_dict`` its weights in the HF
    layout (stray keys dropped; T5's quantised ones packed), ``source`` the file (or
    name) it came from, ``spiece_model`` the SentencePiece model a UMT5 file carries.
    """

    info: TextEncoderInfo | T5Shapes
    state_dict: dict
    source: str
    spiece_model: bytes | None = None

    @property
    def is_t5(self) -> bool:
        return isinstance(self.info, T5Shapes)


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


def _has_t5(sd: Mapping) -> bool:
    return any(k == _T5_MARKER or k.endswith("." + _T5_MARKER) for k in sd)


def _clip_encoders(source: str, sd: Mapping, roles: Sequence[str] | None, taken: Mapping[str, Any], *,
                   strict: bool, allow_missing_layers: bool,
                   released_depths: Mapping[str, int]) -> list[tuple[str, FoundTextEncoder]]:
    out: list[tuple[str, FoundTextEncoder]] = []
    for info in detect_text_encoders(sd):
        result = convert_text_state_dict(sd, encoder=info.name, source=source)
        info = _check_layers(source, info, allow_missing_layers, released_depths)
        _stray_keys(source, info, result.unmatched, strict)
        converted = {k: v for k, v in result.state_dict.items() if k not in set(info.stray_keys)}
        role = _role(info, roles, {**taken, **dict(out)})
        out.append((role, FoundTextEncoder(info, converted, source)))
    return out


def _t5_encoder(checkpoint: T5Checkpoint) -> tuple[str, FoundTextEncoder]:
    return checkpoint.shapes.kind, FoundTextEncoder(checkpoint.shapes, checkpoint.state_dict, checkpoint.source,
                                                    checkpoint.spiece_model)


def _entry_encoders(entry: Entry, roles, taken, *, strict: bool, allow_missing_layers: bool,
                    released_depths: Mapping[str, int], require_finite: bool) -> list[tuple[str, FoundTextEncoder]]:
    """Every encoder of one entry, ``(kind, found)``."""
    if isinstance(entry, T5Checkpoint):
        return [_t5_encoder(entry)]
    source, sd = entry[0], entry[1]
    metadata = entry[2] if len(entry) > 2 else {}
    clip_roles = [role for role in roles or () if role not in T5_KINDS] or None
    found = _clip_encoders(source, sd, clip_roles, taken, strict=strict, allow_missing_layers=allow_missing_layers,
                           released_depths=released_depths)
    if _has_t5(sd):
        found.append(_t5_encoder(t5_checkpoint(sd, metadata, source=source, require_finite=require_finite)))
    if not found:
        raise CheckpointError(f"{source}: no CLIP text encoder found, nor a T5 one")
    return found


def load_text_encoder_state_dicts(state_dicts: Sequence[Entry], *,
                                  roles: Sequence[str] | None = None, strict: bool = False,
                                  allow_missing_layers: bool = False,
                                  released_depths: Mapping[str, int] | None = None,
                                  require_finite: bool = True) -> dict[str, FoundTextEncoder]:
    """Find every text encoder in the given entries, keyed by encoder kind (``l``, ``h``, ``g``,
    ``t5``, ``umt5``).

    Args:
        state_dicts: ``(source, state_dict)`` pairs, ``(source, state_dict, metadata)``
            (a safetensors header's metadata: ComfyUI's quantised T5 files need it) or
            T5 files already read (:class:`~textenc.loading.t5_files.T5Checkpoint`).
        roles: the encoder kinds the requested family takes, in order (SDXL ``("l", "g")``):
            CLIP encoders of non-standard width take the first CLIP kind not yet found,
            file by file; None: ``"l"``.
        released_depths: kind → the released model's depth, for kinds whose files may
            lack that model's last layer and load anyway (``{"h": 24}``: diffusers'
            23-layer SD2 ViT-H, numbered as the full model).
        require_finite: refuse T5 weights holding NaN or infinite values (CLIP's are
            checked when the model loads them).

    Raises:
        CheckpointError: no encoder, two of one kind, missing layers (see
            :func:`~textenc.sd.load_clip`), a bad T5 file (see
            :func:`~textenc.loading.t5_files.load_t5_file`), or (``strict``) keys below an
            encoder's prefix that match no known weight.

    Warns:
        CheckpointWarning: (not ``strict``) such keys, which are ignored.
    """
    found: dict[str, FoundTextEncoder] = {}
    for entry in state_dicts:
        for kind, encoder in _entry_encoders(entry, roles, found, strict=strict,
                                             allow_missing_layers=allow_missing_layers,
                                             released_depths=released_depths or {}, require_finite=require_finite):
            if kind in found:
                raise CheckpointError(f"{encoder.source}: a second {describe_kind(kind)} text encoder "
                                      f"(first from {found[kind].source}); give each encoder once")
            found[kind] = encoder
    return found


def load_text_encoder_files(paths: Sequence[str | os.PathLike], **kwargs: Any) -> dict[str, FoundTextEncoder]:
    """:func:`load_text_encoder_state_dicts` of files: safetensors / pickle checkpoints
    (any text encoders, T5 quantised ones included), T5 ``.gguf`` files and diffusers
    ``T5EncoderModel`` folders (:func:`~textenc.loading.t5_files.load_t5_file`).

    Raises:
        CheckpointError: as :func:`load_text_encoder_state_dicts`, or an unreadable file.
    """
    entries: list[Entry] = []
    for path in paths:
        file = Path(path)
        if file.is_dir() or file.suffix.lower() == ".gguf":
            entries.append(load_t5_file(file, require_finite=kwargs.get("require_finite", True)))
            continue
        metadata = read_safetensors_metadata(file) if file.suffix.lower() == ".safetensors" else {}
        entries.append((str(path), load_state_dict(file), metadata))
    return load_text_encoder_state_dicts(entries, **kwargs)
