"""The on-disk format of an encoded caption dataset: shards, manifest, reader, exporters.

A dataset folder holds ``shard-00000.safetensors`` ... ``empty.safetensors`` and
``manifest.json``. Every shard has the tensors

* ``ids`` int64 [rows]: caption ids (the row index when ids are not integers;
  the real ids then go in the metadata key ``ids`` as a JSON list);
* ``rows`` int64 [rows]: the input row index of each caption;
* ``window_offsets`` int64 [rows+1]: caption r is
  ``cond[offsets[r]*77 : offsets[r+1]*77]``;
* ``cond`` [total_windows·77, width] (absent with ``outputs="pooled"``);
* ``pooled`` [rows, pooled_width];

and string metadata: ``format``, ``model_fingerprint``, ``options`` (JSON),
``shard``, ``row_start``, ``row_stop``, ``ids`` (JSON, string ids only).

Files are written by :func:`write_safetensors`, not by ``safetensors.torch``:
the header is built here with a fixed key order and no timestamps, so the
same shard always has the same bytes (a rebuilt shard is byte-identical).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..errors import DatasetError

__all__ = ["FORMAT_VERSION", "shard_name", "write_safetensors", "atomic_write", "read_manifest",
           "write_manifest", "file_sha256", "open_shards", "export_diffusers", "export_kohya",
           "clean_temp_files", "TEMP_SUFFIX"]

FORMAT_VERSION = "textenc-dataset/1"
TEMP_SUFFIX = ".partial"
_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> list:
    """The pieces of a safetensors file: header bytes then each tensor's data, in the given order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    pieces, offset = [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise DatasetError(f"cannot store tensor {name!r} of dtype {tensor.dtype}")
        data = _tensor_bytes(tensor)
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        pieces.append(data)
        offset += data.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes with spaces
    return [struct.pack("<Q", len(encoded)), encoded] + pieces


def atomic_write(path: str | os.PathLike, pieces: list) -> tuple[str, int]:
    """Write ``pieces`` to ``path`` via a fsync'd temporary file and ``os.replace``.

    Returns:
        ``(sha256 hex, size in bytes)`` of what was written.
    """
    target = Path(path)
    temp = target.with_name(target.name + TEMP_SUFFIX)
    hasher, size = hashlib.sha256(), 0
    with open(temp, "wb") as handle:
        for piece in pieces:
            handle.write(piece)
            hasher.update(piece)
            size += len(piece) if isinstance(piece, bytes) else piece.nbytes
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, target)
    _fsync_dir(target.parent)
    return hasher.hexdigest(), size


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str]) -> tuple[str, int]:
    """Atomically write a deterministic safetensors file → ``(sha256, bytes)``."""
    return atomic_write(path, safetensors_bytes(tensors, metadata))


def file_sha256(path: str | os.PathLike) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(block)
    return hasher.hexdigest()


def clean_temp_files(folder: str | os.PathLike) -> list[str]:
    """Remove temporary files a killed run left behind; returns their names."""
    removed = []
    for path in sorted(Path(folder).glob("*" + TEMP_SUFFIX)):
        path.unlink()
        removed.append(path.name)
    return removed


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def write_manifest(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    atomic_write(Path(folder) / "manifest.json", [manifest_bytes(manifest)])


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's manifest, or None when there is none yet."""
    path = Path(folder) / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable manifest ({exc}); re-run with --overwrite") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise DatasetError(f"{path}: not a {FORMAT_VERSION} manifest; re-run with --overwrite")
    _check_shard_records(path, manifest.get("shards", []))
    return manifest


def _check_shard_records(path: Path, shards: Any) -> None:
    # Readers open folder / record["file"]: only this folder's own shard names
    # may appear there, never "../x" or an absolute path.
    if not isinstance(shards, list):
        raise DatasetError(f"{path}: 'shards' is not a list; re-run with --overwrite")
    for record in shards:
        index = record.get("index") if isinstance(record, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or record.get("file") != shard_name(index):
            raise DatasetError(f"{path}: shard entry {record!r} does not name this folder's shard file; "
                               "re-run with --overwrite")


def _shard_ids(handle, ids: torch.Tensor) -> list:
    metadata = handle.metadata() or {}
    if "ids" in metadata:
        return json.loads(metadata["ids"])
    return ids.tolist()


def open_shards(folder: str | os.PathLike) -> Iterator[tuple[Any, torch.Tensor | None, torch.Tensor]]:
    """Yield ``(id, cond [windows·77, width] or None, pooled [pooled_width])`` per caption.

    Captions come in input-row order (shards in order). Raises DatasetError
    when the folder has no manifest or a shard listed in it is missing.
    """
    from safetensors import SafetensorError, safe_open

    manifest = read_manifest(folder)
    if manifest is None:
        raise DatasetError(f"{folder}: no manifest.json; is this a textenc encode-dataset output?")
    length = int(manifest.get("window_length", 77))
    for shard in manifest["shards"]:
        path = Path(folder) / shard["file"]
        if not path.exists():
            raise DatasetError(f"{path}: listed in the manifest but missing; re-run encode-dataset")
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = set(handle.keys())
                offsets = handle.get_tensor("window_offsets").tolist()
                pooled = handle.get_tensor("pooled")
                cond = handle.get_tensor("cond") if "cond" in names else None
                ids = _shard_ids(handle, handle.get_tensor("ids"))
        except (SafetensorError, OSError) as exc:  # a damaged or foreign file
            raise DatasetError(f"{path}: unreadable shard ({type(exc).__name__}: {exc}); "
                               "re-run encode-dataset") from exc
        for row, row_id in enumerate(ids):
            part = None if cond is None else cond[offsets[row] * length:offsets[row + 1] * length]
            yield row_id, part, pooled[row]


def _safe_stem(row_id: Any) -> str:
    stem = str(row_id)
    if stem.startswith("/") or ".." in Path(stem).parts:
        raise DatasetError(f"id {row_id!r} cannot be used as a file name")
    return stem


def export_diffusers(folder: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write ``{out}/{id}.safetensors`` with ``prompt_embeds`` [1, T, D] and
    ``pooled_prompt_embeds`` [1, P] per caption (diffusers pipeline argument names)."""
    count = 0
    for row_id, cond, pooled in open_shards(folder):
        if cond is None:
            raise DatasetError(f"{folder}: encoded with outputs=pooled; diffusers export needs cond")
        target = Path(out) / f"{_safe_stem(row_id)}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(target, {"prompt_embeds": cond.unsqueeze(0),
                                   "pooled_prompt_embeds": pooled.unsqueeze(0)}, {})
        count += 1
    return count


def export_kohya(folder: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write kohya sd-scripts style ``{out}/{id}_te_outputs.npz`` per caption.

    SDXL (as sd-scripts' ``TextEncoderOutputsCachingStrategy``): ``hidden_state1``
    (CLIP-L, [T, 768]), ``hidden_state2`` (bigG, [T, 1280]) and ``pool2`` ([1280]);
    SD1/SD2: ``hidden_state`` [T, D] and ``pool`` [P]. Arrays are float32.
    """
    import numpy as np

    manifest = read_manifest(folder) or {}
    split = manifest.get("widths", {}).get("l") if manifest.get("kind") == "sdxl" else None
    count = 0
    for row_id, cond, pooled in open_shards(folder):
        target = Path(out) / f"{_safe_stem(row_id)}_te_outputs.npz"
        target.parent.mkdir(parents=True, exist_ok=True)
        if split is not None:
            arrays = {"pool2": pooled.float().numpy()}
            if cond is not None:
                arrays.update(hidden_state1=cond[:, :split].float().numpy(),
                              hidden_state2=cond[:, split:].float().numpy())
        else:
            arrays = {"pool": pooled.float().numpy()}
            if cond is not None:
                arrays["hidden_state"] = cond.float().numpy()
        np.savez(target, **arrays)
        count += 1
    return count
