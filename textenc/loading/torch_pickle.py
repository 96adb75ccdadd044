"""Read torch pickle checkpoints (``.pt``, ``.ckpt``, ``.bin``, ``.pth``) weights-only.

Used by :func:`textenc.loading.checkpoint.load_state_dict`; call that instead. Files go
through :func:`torch.load` with ``weights_only=True`` (and ``mmap=True`` for zip
archives) after the zip directory is checked against the file size. textenc
never runs unrestricted pickle: a file that needs code to load is refused.
"""

from __future__ import annotations

import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from textenc.errors import CheckpointError

__all__ = ["MIN_TORCH_VERSION", "MAX_NESTING", "load_torch_state_dict"]

# Weights-only loading in torch < 2.10 had known bypasses (e.g. CVE-2025-32434
# affected <= 2.5.1), so older torch versions are refused for pickle files.
MIN_TORCH_VERSION = (2, 10)

# Deepest dict nesting flattened. Real files nest one level (PhotoMaker); the cap
# stops a hostile self-referencing pickle from recursing forever.
MAX_NESTING = 8

_CONVERT_HINT = (
    "convert it to .safetensors with a trusted tool, or download the "
    ".safetensors release of this model"
)


def _require_torch_version(version: str, *, file: Path) -> None:
    """Refuse pickle loading on torch versions whose weights-only mode had bypasses."""
    match = re.match(r"(\d+)\.(\d+)", version)
    found = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if found < MIN_TORCH_VERSION:
        wanted = ".".join(map(str, MIN_TORCH_VERSION))
        raise CheckpointError(
            f"{file}: loading pickle checkpoints needs torch >= {wanted} (found "
            f"{version}); older weights-only loaders could be bypassed. Upgrade "
            f"torch, or {_CONVERT_HINT}."
        )


def _check_zip_members(file: Path) -> None:
    """Refuse zip archives whose members claim more bytes than the file holds."""
    file_size = file.stat().st_size
    try:
        with zipfile.ZipFile(file) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: corrupt zip archive ({exc}); download it again.") from exc
    for member in members:
        stored = member.compress_type == zipfile.ZIP_STORED
        if not stored or member.file_size != member.compress_size:
            raise CheckpointError(
                f"{file}: archive member {member.filename!r} is compressed, which "
                f"torch.save never does; the file is not a plain torch checkpoint, {_CONVERT_HINT}."
            )
        if member.header_offset + member.compress_size > file_size:
            raise CheckpointError(
                f"{file}: archive member {member.filename!r} declares "
                f"{member.file_size} bytes but the file has {file_size}; it is "
                "truncated or hostile, download it again."
            )


def _torch_load(file: Path, *, device: str | torch.device) -> object:
    _require_torch_version(torch.__version__, file=file)
    with open(file, "rb") as handle:
        is_zip_magic = handle.read(4) == b"PK\x03\x04"
    is_zip = zipfile.is_zipfile(file)
    if is_zip_magic and not is_zip:
        raise CheckpointError(
            f"{file}: zip archive has no end record; it is truncated, download it again."
        )
    if is_zip:
        _check_zip_members(file)
    try:
        return torch.load(file, map_location=device, weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file}: refused to load: it needs code to unpickle and textenc never "
            f"runs code from files ({_unpickler_reason(exc)}); {_CONVERT_HINT}."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error) as exc:
        raise CheckpointError(
            f"{file}: not a readable torch checkpoint ({exc}); it is truncated or "
            "corrupt, download it again."
        ) from exc


def _unpickler_reason(exc: pickle.UnpicklingError) -> str:
    """The one-line cause from torch's weights-only error, without its advice
    to retry with ``weights_only=False`` (which would run the file's code)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text[text.index(marker) + len(marker):]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    return reason.split(". Please use", 1)[0][:200]


def load_torch_state_dict(file: Path, *, device: str | torch.device,
                          flatten: bool = False) -> dict[str, torch.Tensor]:
    """Read a ``{key: tensor}`` dict from a torch pickle file, weights-only.

    A top-level ``"state_dict"`` wrapper is unwrapped. With ``flatten``, dicts
    of tensors inside are flattened to dotted keys. ``file`` must already be
    checked to be a regular, non-empty file (see :func:`textenc.loading.checkpoint.load_state_dict`).

    Raises:
        CheckpointError: The file is unsafe or unreadable, holds non-tensors,
            or (with ``flatten``) a key twice or nesting deeper than :data:`MAX_NESTING`.
    """
    loaded = _torch_load(file, device=device)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{file}: holds a {type(loaded).__name__}, not a state dict of tensors."
        )
    state_dict: dict[str, torch.Tensor] = {}
    _collect(file, loaded, "", state_dict, flatten=flatten, depth=0)
    return state_dict


def _collect(file: Path, loaded: Mapping, prefix: str, out: dict[str, torch.Tensor],
             *, flatten: bool, depth: int) -> None:
    """Put the tensors of ``loaded`` into ``out`` as ``prefix + key``, descending into
    nested dicts when ``flatten``; anything else is refused."""
    for key, value in loaded.items():
        name = prefix + key if isinstance(key, str) else key
        if isinstance(key, str) and isinstance(value, Mapping) and flatten and depth < MAX_NESTING:
            _collect(file, value, name + ".", out, flatten=flatten, depth=depth + 1)
        elif not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file}: entry {name!r} {_why_refused(key, value, flatten)}")
        elif name in out:
            raise CheckpointError(f"{file}: key {name!r} is in the file twice, flat and "
                                  f"nested; the file is ambiguous, {_CONVERT_HINT}.")
        else:
            out[name] = value


def _why_refused(key: object, value: object, flatten: bool) -> str:
    if not (isinstance(key, str) and isinstance(value, Mapping)):
        return (f"is a {type(value).__name__}, not a tensor; only flat state dicts are "
                f"supported, {_CONVERT_HINT}.")
    if flatten:
        return (f"is nested more than {MAX_NESTING} levels deep; the file is malformed "
                f"or hostile, {_CONVERT_HINT}.")
    return (f"is a {type(value).__name__}, not a tensor; only flat state dicts are supported "
            "unless load_state_dict(..., nested='flatten') is asked to join nested keys "
            f"with dots, or {_CONVERT_HINT}.")
