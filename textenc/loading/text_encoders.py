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


#: ComfyUI's ``detect_te_model`` (comfy/sd.py): a CLIP text encoder with a layer index 30
#: (``text_model.encoder.layers.30.mlp.fc1.weight``) is CLIP-G, one with a layer index 22 is
#: CLIP-H, any other CLIP-L; its SDXL and SD3 ``load_sd`` put a layer-30 file in G, others in L.
_COMFY_DEPTH_KINDS = ((31, "g"), (23, "h"))
#: The depth order of the CLIP kinds (the released L 12, H 24, G 32 layers).
_DEPTH_ORDER = ("l", "h", "g")


def _kind(info: TextEncoderInfo) -> str | None:
    """The encoder kind the keys decide: the width names a released model, or the depth does
    as ComfyUI's; None for a non-standard width of fewer than 23 layers (ComfyUI: CLIP-L)."""
    if info.name in _DEPTH_ORDER:
        return info.name
    return next((kind for depth, kind in _COMFY_DEPTH_KINDS if info.num_layers >= depth), None)


def _shape_key(encoder: FoundTextEncoder) -> tuple[int, int]:
    return encoder.info.num_layers, encoder.info.hidden_size


def _resolve_kinds(pending: Sequence[tuple[str | None, FoundTextEncoder]], roles: Sequence[str] | None) -> list[str]:
    """Give the shallow non-standard CLIP encoders (kind None) their kinds, whatever the file order.

    ComfyUI reads every one of them as CLIP-L. With one, or without a requested family, so does
    textenc. Where the family needs several CLIP kinds the others leave free (tiny SDXL / SD3
    test models), the deeper encoder, then the wider, takes the deeper kind (G over L), as
    ComfyUI's depth rule orders them; two of one shape are refused, as nothing tells them apart.
    """
    kinds = [kind for kind, _ in pending]
    unresolved = sorted((i for i, kind in enumerate(kinds) if kind is None), key=lambda i: _shape_key(pending[i][1]))
    free = [kind for kind in _DEPTH_ORDER if kind in (roles or ()) and kind not in kinds] or ["l"]
    for first, second in zip(unresolved, unresolved[1:len(free)]):
        if _shape_key(pending[first][1]) == _shape_key(pending[second][1]):
            raise CheckpointError(
                f"{pending[first][1].source} and {pending[second][1].source}: two CLIP text encoders of "
                f"{pending[first][1].info.num_layers} layers and width {pending[first][1].info.hidden_size}; "
                "neither says which is CLIP-L and which CLIP-G (ComfyUI takes a CLIP with 31 or more layers "
                "for G); save them under naming prefixes (clip_l.transformer., clip_g.transformer.)")
    for rank, index in enumerate(unresolved):
        kinds[index] = free[min(rank, len(free) - 1)]
    return kinds


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


def _clip_encoders(source: str, sd: Mapping, *, strict: bool, allow_missing_layers: bool,
                   released_depths: Mapping[str, int]) -> list[tuple[str | None, FoundTextEncoder]]:
    """Each CLIP encoder of ``sd`` with its kind (None: left to :func:`_resolve_kinds`)."""
    out: list[tuple[str | None, FoundTextEncoder]] = []
    for info in detect_text_encoders(sd):
        result = convert_text_state_dict(sd, encoder=info.name, source=source)
        info = _check_layers(source, info, allow_missing_layers, released_depths)
        _stray_keys(source, info, result.unmatched, strict)
        converted = {k: v for k, v in result.state_dict.items() if k not in set(info.stray_keys)}
        out.append((_kind(info), FoundTextEncoder(info, converted, source)))
    return out


def _t5_encoder(checkpoint: T5Checkpoint) -> tuple[str, FoundTextEncoder]:
    return checkpoint.shapes.kind, FoundTextEncoder(checkpoint.shapes, checkpoint.state_dict, checkpoint.source,
                                                    checkpoint.spiece_model)


def _entry_encoders(entry: Entry, *, strict: bool, allow_missing_layers: bool, released_depths: Mapping[str, int],
                    require_finite: bool) -> list[tuple[str | None, FoundTextEncoder]]:
    """Every encoder of one entry, ``(kind, found)`` (kind None: a CLIP the keys do not name)."""
    if isinstance(entry, T5Checkpoint):
        return [_t5_encoder(entry)]
    source, sd = entry[0], entry[1]
    metadata = entry[2] if len(entry) > 2 else {}
    found = _clip_encoders(source, sd, strict=strict, allow_missing_layers=allow_missing_layers,
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
        roles: the encoder kinds the requested family takes (SDXL ``("l", "g")``). A CLIP
            encoder of non-standard width is named by its depth as ComfyUI's
            ``detect_te_model`` names it (31+ layers G, 23+ H); shallower ones take the
            family's CLIP kinds the others leave free, the deeper (then wider) one the
            deeper kind, whatever the file order; None: ``"l"``.
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
    pending = [pair for entry in state_dicts
               for pair in _entry_encoders(entry, strict=strict, allow_missing_layers=allow_missing_layers,
                                           released_depths=released_depths or {}, require_finite=require_finite)]
    found: dict[str, FoundTextEncoder] = {}
    for kind, (_, encoder) in zip(_resolve_kinds(pending, roles), pending):
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
