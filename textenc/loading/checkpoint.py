"""Read checkpoint files safely into ``{key: tensor}`` state dicts.

Two formats are read:

* ``.safetensors``: the header is parsed and validated here first (length,
  JSON, duplicate keys, dtypes, shapes versus byte spans, offsets in bounds and
  not overlapping), then tensors are memory-mapped with
  :func:`safetensors.safe_open`, so nothing is copied into fresh memory.
* ``.pt`` / ``.ckpt`` / ``.bin`` / ``.pth``: :func:`torch.load` with
  ``weights_only=True`` and ``mmap=True`` for zip archives (in
  :mod:`textenc.loading.torch_pickle`). textenc never runs unrestricted pickle: a
  file that needs code to load is refused.

Every failure is a :class:`textenc.errors.CheckpointError` (a ``ValueError``)
naming the path and the fix.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

from textenc.nn.packed import PackedWeight
from textenc.loading.torch_pickle import MAX_NESTING, MIN_TORCH_VERSION, load_torch_state_dict
from textenc.errors import CheckpointError, TextencError

__all__ = [
    "SAFETENSORS_SUFFIXES",
    "TORCH_SUFFIXES",
    "MIN_TORCH_VERSION",
    "MAX_NESTING",
    "SafetensorsEntry",
    "load_state_dict",
    "read_safetensors_header",
    "read_safetensors_metadata",
    "check_finite",
    "is_finite",
    "ALIGNMENT",
    "aligned",
]

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")

# Same cap as the safetensors library: a real header is a few hundred KB at
# most, and a larger length is a corrupt or hostile file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

# Bytes per element of each safetensors dtype this reader accepts. Sub-byte
# dtypes (F4, F6_*) are left out on purpose: no CLIP checkpoint uses them.
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor's record in a safetensors header.

    Attributes:
        name: The tensor's key.
        dtype: The safetensors dtype name, e.g. ``"F16"``.
        shape: The tensor shape.
        begin: First byte of the tensor, relative to the end of the header.
        end: One past the last byte, relative to the end of the header.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def load_state_dict(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    require_finite: bool = False,
    nested: Literal["refuse", "flatten"] = "refuse",
) -> dict[str, torch.Tensor]:
    """Load a checkpoint file into a flat ``{key: tensor}`` dict, safely.

    Args:
        path: A ``.safetensors``, ``.pt``, ``.ckpt``, ``.bin`` or ``.pth`` file.
        device: Where tensors are placed (``"cpu"`` keeps them memory-mapped).
        require_finite: Also run :func:`check_finite` on the result.
        nested: What to do when a pickle file's values are dicts of tensors,
            as in PhotoMaker's ``{"id_encoder": {...}, "lora_weights": {...}}``:
            ``"refuse"`` raises; ``"flatten"`` joins the keys with dots
            (``"id_encoder.vision_model..."``). Either way the file is read
            weights-only and every leaf must be a tensor. safetensors files
            are flat already.

    Returns:
        The state dict. A top-level ``"state_dict"`` wrapper (as in Stable
        Diffusion ``.ckpt`` files) is unwrapped. Tensors may be memory-mapped
        views of the file; treat them as read-only.

    Raises:
        CheckpointError: The file is missing, a directory, empty, truncated,
            malformed, would need code to unpickle, or holds non-tensors;
            it holds nested dicts and ``nested="refuse"``; flattening gives a
            key twice or goes deeper than ``MAX_NESTING`` levels.
        TextencError: ``nested`` is not ``"refuse"`` or ``"flatten"``.
    """
    if nested not in ("refuse", "flatten"):
        raise TextencError(f"nested={nested!r}; use nested='refuse' or nested='flatten'.")
    file = _check_regular_file(path)
    suffix = file.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        state_dict = _load_safetensors(file, device=device)
    elif suffix in TORCH_SUFFIXES:
        state_dict = load_torch_state_dict(file, device=device, flatten=nested == "flatten")
    else:
        raise CheckpointError(
            f"{file}: unknown checkpoint extension {suffix!r}; expected one of "
            f"{SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}. Rename the file if it is "
            "one of these formats."
        )
    if require_finite:
        check_finite(state_dict, file)
    return state_dict


def check_finite(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]
) -> None:
    """Raise if any floating-point tensor holds NaN or infinity.

    Args:
        state_dict: The tensors to check.
        path: The file they came from, named in the error.

    Raises:
        CheckpointError: Names the first key (in dict order) that is not finite.

    >>> check_finite({"w": torch.ones(2)}, "model.safetensors")
    >>> check_finite({"w": torch.tensor([1.0, float("nan")])}, "m.pt")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    textenc.errors.CheckpointError: m.pt: tensor 'w' holds NaN or infinite values; ...
    """
    for key, tensor in state_dict.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        if not is_finite(tensor):
            raise CheckpointError(
                f"{path}: tensor {key!r} holds NaN or infinite values; the file "
                "is corrupt or was saved from a diverged training run; use "
                "another copy."
            )


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or infinity, cheaply.

    A NaN or an infinity makes the sum non-finite, and summing reads each
    value once without a temporary (several times faster than
    ``torch.isfinite(tensor).all()``: 45–172 ms against 1.8–4.1 s for CLIP-L's
    fp16 weights on one thread, see ``bench/bench_weight_scan.py``). A non-finite sum can also be
    an overflow of the sum itself, so only then is every value checked.

    >>> is_finite(torch.full((4,), 60000.0, dtype=torch.float16)), is_finite(torch.tensor([1.0, float("inf")]))
    (True, False)
    """
    if tensor.numel() == 0:
        return True
    try:
        total = tensor.sum()
    except RuntimeError:  # dtypes without a sum kernel (float8): widen first
        tensor = tensor.float()
        total = tensor.sum()
    if math.isfinite(total.item()):  # one number: item() is cheaper than a tensor op per weight
        return True
    return bool(torch.isfinite(tensor).all())


#: Byte alignment of PyTorch's CPU allocator (c10 ``gAlignment``).
ALIGNMENT = 64


def aligned(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with each tensor whose data is not ``ALIGNMENT``-byte aligned copied.

    safetensors (and ``torch.load(mmap=True)``) hand out views into the
    memory-mapped file at whatever byte offset the file stores them (often only
    4- or 8-byte aligned), and the models keep them as their parameters
    (``assign=True``). CPU matmul kernels take another code path for such
    weights and round differently in the last bit, so the same weights would
    encode differently depending on the file's layout. Aligned tensors stay
    shared with the file, so only the unaligned ones cost memory. Every loader
    that assigns weights calls this just before assigning.

    >>> base = torch.zeros(40)
    >>> [t.data_ptr() % ALIGNMENT for t in aligned({"view": base[1:], "whole": base}).values()]
    [0, 0]
    """
    return {key: value if isinstance(value, PackedWeight) or value.data_ptr() % ALIGNMENT == 0
            else value.clone() for key, value in state_dict.items()}


def _check_regular_file(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a Path if it is a non-empty regular file."""
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"{file}: file does not exist; check the path.")
    if file.is_dir():
        raise CheckpointError(
            f"{file}: is a directory; pass the checkpoint file inside it."
        )
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc}).") from exc
    if size == 0:
        raise CheckpointError(
            f"{file}: file is empty (0 bytes); the download or copy failed, "
            "fetch it again."
        )
    return file


# --------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------


def read_safetensors_header(
    path: str | os.PathLike[str],
) -> tuple[SafetensorsEntry, ...]:
    """Parse and validate a safetensors header without reading any tensor.

    Checks the 8-byte little-endian header length against the file size, the
    JSON (no duplicate keys), each dtype, that ``prod(shape) * itemsize``
    equals the byte span, and that spans lie inside the file without
    overlapping.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        The entries, sorted by offset.

    Raises:
        CheckpointError: On any of the problems above.
    """
    file = _check_regular_file(path)
    header, data_size = _read_header(file)
    entries = _header_entries(file, header)
    _check_spans(file, entries, data_size=data_size)
    return entries


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors header (``{}`` when it has none).

    ComfyUI keeps per-layer quantisation formats there (``_quantization_metadata``).

    Raises:
        CheckpointError: The header is malformed (see :func:`read_safetensors_header`),
            or ``__metadata__`` is not an object of strings.
    """
    file = _check_regular_file(path)
    metadata = _read_header(file)[0].get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{file}: safetensors __metadata__ must map names to strings; "
                              "the file is malformed, re-save it.")
    return metadata


def _read_header(file: Path) -> tuple[dict[str, object], int]:
    """The parsed header JSON and the number of data bytes after it."""
    file_size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _truncated(file, f"{file_size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(file_size - 8, _MAX_HEADER_BYTES):
                raise _truncated(
                    file, f"header claims {header_len} bytes but the file has {file_size}"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc}).") from exc
    return _parse_header_json(file, raw), file_size - 8 - header_len


def _truncated(file: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{file}: not a valid safetensors file ({detail}); it is truncated or "
        "corrupt, download it again."
    )


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json`` hook: build a dict, refusing a key seen twice."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise CheckpointError(f"duplicate key {key!r} in the safetensors header")
        result[key] = value
    return result


def _parse_header_json(file: Path, raw: bytes) -> dict[str, object]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except CheckpointError as exc:
        raise CheckpointError(f"{file}: {exc}; the file is malformed, re-save it.") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{file}: safetensors header is not valid JSON ({exc}); the file is "
            "truncated or not a safetensors file."
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not a JSON object.")
    return header


def _header_entries(file: Path, header: dict[str, object]) -> tuple[SafetensorsEntry, ...]:
    entries = []
    for name, record in header.items():
        if name == "__metadata__":
            continue
        entries.append(_parse_entry(file, name, record))
    return tuple(sorted(entries, key=lambda entry: (entry.begin, entry.end)))


def _parse_entry(file: Path, name: str, record: object) -> SafetensorsEntry:
    def bad(detail: str) -> CheckpointError:
        return CheckpointError(f"{file}: tensor {name!r}: {detail}; the file is malformed.")

    if not isinstance(record, dict) or set(record) != {"dtype", "shape", "data_offsets"}:
        raise bad("record must hold exactly dtype, shape and data_offsets")
    dtype, shape, offsets = record["dtype"], record["shape"], record["data_offsets"]
    if dtype not in _SAFETENSORS_ITEMSIZE:
        raise bad(f"unknown dtype {dtype!r} (known: {sorted(_SAFETENSORS_ITEMSIZE)})")
    if not _is_int_list(shape) or not _is_int_list(offsets) or len(offsets) != 2:
        raise bad("shape and data_offsets must be lists of non-negative integers")
    begin, end = offsets
    expected = math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]
    if end < begin or end - begin != expected:
        raise bad(f"shape {shape} of {dtype} needs {expected} bytes but offsets span {end - begin}")
    return SafetensorsEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in value
    )


def _check_spans(file: Path, entries: tuple[SafetensorsEntry, ...], *, data_size: int) -> None:
    previous_end, previous_name = 0, None
    for entry in entries:
        if entry.end > data_size:
            detail = f"tensor {entry.name!r} ends at byte {entry.end} of {data_size} data bytes"
            raise _truncated(file, detail)
        if entry.begin < previous_end:
            raise CheckpointError(
                f"{file}: tensors {previous_name!r} and {entry.name!r} overlap in "
                "the file; the file is malformed or hostile, do not use it."
            )
        previous_end, previous_name = entry.end, entry.name


def _load_safetensors(file: Path, *, device: str | torch.device) -> dict[str, torch.Tensor]:
    entries = read_safetensors_header(file)
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as handle:
            return {entry.name: handle.get_tensor(entry.name) for entry in entries}
    except (SafetensorError, OSError, RuntimeError, TypeError) as exc:
        raise CheckpointError(
            f"{file}: safetensors could not read it ({exc}); the file is corrupt "
            "or uses an unsupported dtype, download or re-save it."
        ) from exc
