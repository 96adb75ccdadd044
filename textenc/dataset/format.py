"""The on-disk format of an encoded caption dataset: shards, manifest, reader
(the exporters are in :mod:`textenc.dataset.export`).

A dataset folder holds ``shard-00000.safetensors`` ... ``empty.safetensors`` and
``manifest.json``. Every shard has the tensors

* ``ids`` int64 [rows]: caption ids (the row index when ids are not integers;
  the real ids then go in the metadata key ``ids`` as a JSON list);
* ``rows`` int64 [rows]: the input row index of each caption;
* ``window_offsets`` int64 [rows+1]: caption r is
  ``cond[offsets[r]*77 : offsets[r+1]*77]``;
* ``cond`` [total_windows·77, width] (absent with ``outputs="pooled"``);
* ``pooled`` [rows, pooled_width] (absent for Wan, which has none);

and, for a family with a T5 role (SD3, Flux, Wan; the manifest's ``layout``, see
:mod:`textenc.dataset.layout`): ``cond`` holds only the CLIP rows (SD3's, at width 2048;
absent for Flux and Wan), and

* ``t5_offsets`` int64 [rows+1]: caption r's T5 rows are ``t5[t5_offsets[r]:t5_offsets[r+1]]``;
* ``t5`` [total T5 rows, t5_width]: each caption at its own length (the family's minimum
  or longer), not padded to a common one;
* ``t5_tokens`` int64 [rows]: real T5 tokens through ``</s>``;
* ``clip_tokens`` int64 [rows]: real tokens of the first CLIP window (SD3, Flux);

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
import re
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import torch

from ..errors import DatasetError, DatasetIncompleteError, DatasetWarning
from ..warn import warn_at_caller
from .lock import writer_alive, writer_tag

__all__ = ["FORMAT_VERSION", "shard_name", "tensor_bytes", "write_safetensors", "atomic_write", "read_manifest",
           "write_manifest", "file_sha256", "open_shards", "open_captions", "Caption",
           "clean_temp_files", "temp_path", "TEMP_SUFFIX"]

FORMAT_VERSION = "textenc-dataset/1"
TEMP_SUFFIX = ".partial"
# Temporary files are "<target>.textenc-<host>-<pid>.partial" (see temp_path); the
# cleanup removes only those, for this folder's own targets, whose writer is gone.
_TARGETS = r"(?:shard-\d{5}\.safetensors|empty\.safetensors|manifest\.json)"
_TEMP_NAME = re.compile(rf"^{_TARGETS}(?:\.textenc-(?P<writer>[A-Za-z0-9_]+-\d+))?{re.escape(TEMP_SUFFIX)}$")
_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw bytes in the machine's byte order (little-endian on x86 and ARM, as
    safetensors stores them); a view where the tensor is already contiguous on the CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> list:
    """The pieces of a safetensors file: header bytes then each tensor's data, in the given order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    pieces, offset = [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise DatasetError(f"cannot store tensor {name!r} of dtype {tensor.dtype}")
        data = tensor_bytes(tensor)
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
    temp = temp_path(target)
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


def temp_path(target: str | os.PathLike) -> Path:
    """Where :func:`atomic_write` writes ``target`` before renaming it: beside it, named
    after it and after the writing process (``<name>.textenc-<host>-<pid>.partial``)."""
    target = Path(target)
    return target.with_name(f"{target.name}.textenc-{writer_tag()}{TEMP_SUFFIX}")


def clean_temp_files(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files killed runs left in a dataset folder → their names.

    Only files this module names are touched (``shard-NNNNN.safetensors``,
    ``empty.safetensors`` or ``manifest.json`` plus the writer's tag and
    ``.partial``, or plus ``.partial`` alone as older versions wrote them), and
    only when their writer is no longer running on this host; a user's
    ``notes.partial`` and a live run's temporary file are left alone.
    """
    removed = []
    for path in sorted(Path(folder).glob("*" + TEMP_SUFFIX)):
        match = _TEMP_NAME.match(path.name)
        if match is None or (match["writer"] and writer_alive(match["writer"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The manifest as UTF-8 JSON. A lone surrogate (from a non-UTF-8 file name, say) is
    written as its JSON escape ``\\udXXX``, so no id or reason can stop the manifest."""
    text = json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    return text.encode("utf-8", "backslashreplace")


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


def _verify_sha256(path: Path, shard: Mapping[str, Any]) -> None:
    digest = file_sha256(path)
    if digest != shard.get("sha256"):
        raise DatasetError(f"{path}: its sha256 {digest[:16]}... is not the manifest's "
                           f"{str(shard.get('sha256'))[:16]}... (the file was changed or replaced "
                           "after it was written); re-run encode-dataset to rebuild it")


def _check_shard_rows(path: Path, shard: Mapping[str, Any], manifest: Mapping[str, Any],
                      metadata: Mapping[str, str], rows: list[int], ids: list) -> None:
    """The file holds the rows the manifest lists for this shard, from this encoding."""
    start, stop = shard.get("row_start"), shard.get("row_stop")
    rejected = {entry.get("row") for entry in shard.get("rejected", [])}
    expected = [row for row in range(start, stop) if row not in rejected] if isinstance(start, int) \
        and isinstance(stop, int) else None
    found = {"shard": metadata.get("shard"), "row_start": metadata.get("row_start"),
             "row_stop": metadata.get("row_stop"), "model_fingerprint": metadata.get("model_fingerprint"),
             "options": metadata.get("options"), "rows": rows, "ids": len(ids)}
    wanted = {"shard": str(shard["index"]), "row_start": str(start), "row_stop": str(stop),
              "model_fingerprint": manifest.get("model_fingerprint"),
              "options": json.dumps(manifest.get("options"), sort_keys=True), "rows": expected,
              "ids": shard.get("rows")}
    wrong = [key for key in wanted if found[key] != wanted[key]]
    if wrong:
        raise DatasetError(f"{path}: holds other rows than the manifest lists for {shard['file']} "
                           f"({', '.join(wrong)} differ; a file from another shard or another "
                           "encoding?); re-run encode-dataset to rebuild it")


class Caption(NamedTuple):
    """One stored caption as :func:`open_captions` reads it."""

    id: Any
    cond: torch.Tensor | None  # ComfyUI's cond (T, width); None with outputs="pooled"
    pooled: torch.Tensor | None  # (pooled_width,); None: the family has none (Wan)
    clip: torch.Tensor | None = None  # T5 families: the stored CLIP rows (77·windows, cond_width)
    t5: torch.Tensor | None = None  # T5 families: the T5 rows (T, t5_width)
    t5_tokens: int = 0  # real T5 tokens, through </s>
    clip_tokens: int = 0  # real tokens of the first CLIP window (start, text, end)


def _read_shard(path: Path) -> tuple[dict, dict[str, torch.Tensor], list]:
    """``(metadata, tensors by name, ids)`` of one shard file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            ids = _shard_ids(handle, tensors["ids"])
            metadata = handle.metadata() or {}
        tensors["window_offsets"], tensors["rows"]  # noqa: B018 - every shard has them
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as exc:  # a damaged or foreign file
        raise DatasetError(f"{path}: unreadable shard ({type(exc).__name__}: {exc}); "
                           "re-run encode-dataset") from exc
    return metadata, tensors, ids


def _check_complete(folder: str | os.PathLike, manifest: Mapping[str, Any], *, allow_incomplete: bool) -> None:
    """Refuse a folder whose run has not finished every shard; with ``allow_incomplete``,
    warn instead (:class:`~textenc.errors.DatasetWarning`)."""
    if manifest.get("complete") is True:
        return
    shards = manifest.get("shards", [])
    rows = sum(record["row_stop"] - record["row_start"] for record in shards
               if isinstance(record.get("row_start"), int) and isinstance(record.get("row_stop"), int))
    source = manifest.get("input")
    total_rows = source.get("rows", "?") if isinstance(source, dict) else "?"
    state = (f"{folder}: the encoding is not finished: {len(shards)} of {manifest.get('num_shards', '?')} "
             f"shards are finished (covering {rows} of {total_rows} input rows)")
    finish = "run the same encode-dataset command again to finish it (it resumes)"
    if not allow_incomplete:
        raise DatasetIncompleteError(f"{state}; {finish}, or pass allow_incomplete=True to read the "
                                     "finished shards only")
    warn_at_caller(f"{state}; reading only those. To read every row, {finish}", DatasetWarning)


def open_shards(folder: str | os.PathLike, *, verify: bool = True, allow_incomplete: bool = False
                ) -> Iterator[tuple[Any, torch.Tensor | None, torch.Tensor | None]]:
    """Yield ``(id, cond [T, width] or None, pooled [pooled_width] or None)`` per caption.

    ``cond`` is ComfyUI's: SD1/SD2/SDXL ``77·windows`` rows; SD3 its CLIP rows (zero-padded
    to T5's width again) then its T5 rows; Flux and Wan their T5 rows. ``pooled`` is None
    for Wan. :func:`open_captions` gives the stored parts and token counts too.

    Captions come in input-row order (shards in order). A folder whose run has
    not finished (the manifest is not ``complete``: the run was interrupted,
    or is still writing) is refused, because training on it would silently
    use a subset of the captions; ``allow_incomplete=True`` reads its finished
    shards and warns with :class:`~textenc.errors.DatasetWarning`. The manifest
    is checked when ``open_shards`` is called, the shards as they are read.

    Before yielding from a shard, its sha256 is checked against the manifest
    (``verify=False`` skips that hash, which reads every byte of every shard
    twice; use it for speed when the files are known good), and in every case
    its metadata and row list are checked against the manifest's record of
    that shard, so a shard file copied over another is refused even without
    the hash.

    Raises:
        DatasetIncompleteError: the run has not finished every shard (the
            message says how many are, and to run the same command again).
        DatasetError: no manifest; a listed shard is missing, unreadable, not
            the bytes the manifest records, or holds other rows (the message
            names the shard file).
    """
    captions = open_captions(folder, verify=verify, allow_incomplete=allow_incomplete)
    return ((caption.id, caption.cond, caption.pooled) for caption in captions)


def open_captions(folder: str | os.PathLike, *, verify: bool = True, allow_incomplete: bool = False
                  ) -> Iterator[Caption]:
    """Each stored caption as a :class:`Caption`; checks and raises as :func:`open_shards`."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise DatasetError(f"{folder}: no manifest.json; is this a textenc encode-dataset output?")
    _check_complete(folder, manifest, allow_incomplete=allow_incomplete)
    return _read_rows(Path(folder), manifest, verify=verify)


def _pad_clip(clip: torch.Tensor | None, width: int) -> torch.Tensor | None:
    if clip is None or not clip.shape[0]:
        return None
    return torch.nn.functional.pad(clip, (0, width - clip.shape[1]))


def _caption(row_id: Any, row: int, tensors: Mapping[str, torch.Tensor], layout: Mapping[str, Any] | None,
             length: int) -> Caption:
    offsets = tensors["window_offsets"]
    cond = tensors.get("cond")
    clip = None if cond is None else cond[offsets[row] * length:offsets[row + 1] * length]
    pooled = tensors["pooled"][row] if "pooled" in tensors else None
    if layout is None:
        return Caption(row_id, clip, pooled)
    t5 = None
    if "t5" in tensors:
        t5_offsets = tensors["t5_offsets"]
        t5 = tensors["t5"][t5_offsets[row]:t5_offsets[row + 1]]
    parts = [part for part in (_pad_clip(clip, int(layout["full_width"])), t5) if part is not None]
    joined = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else None)
    t5_tokens = int(tensors["t5_tokens"][row]) if "t5_tokens" in tensors else 0
    clip_tokens = int(tensors["clip_tokens"][row]) if "clip_tokens" in tensors else 0
    return Caption(row_id, joined, pooled, clip, t5, t5_tokens, clip_tokens)


def _read_rows(folder: Path, manifest: Mapping[str, Any], *, verify: bool) -> Iterator[Caption]:
    length = int(manifest.get("window_length", 77))
    layout = manifest.get("layout")
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        if not path.exists():
            raise DatasetError(f"{path}: listed in the manifest but missing; re-run encode-dataset")
        if verify:
            _verify_sha256(path, shard)
        metadata, tensors, ids = _read_shard(path)
        _check_shard_rows(path, shard, manifest, metadata, tensors["rows"].tolist(), ids)
        for row, row_id in enumerate(ids):
            yield _caption(row_id, row, tensors, layout, length)
