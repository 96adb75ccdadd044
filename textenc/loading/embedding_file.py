"""Reading one textual-inversion file safely: no pickle code is ever run.

Used by :class:`textenc.loading.embeddings.EmbeddingLoader` once a name has been
located; :func:`read_or_reason` gives the validated vectors or the reason the
file is refused.

* ``.safetensors`` files are read with ``safetensors.safe_open``.
* ``.pt``/``.bin`` are read with ``torch.load(weights_only=True)``; never an
  unrestricted unpickler. When that fails on a zip archive, a fallback reads
  the pickle's opcodes with :mod:`pickletools` (nothing is executed) to find
  each storage's dtype and key, and reads the raw bytes of ``data/<key>``.
  The tensor shape is not rebuilt: the last storage whose size is a multiple
  of the embedding width is used, as rows of that width (ComfyUI's
  ``safe_load_embed_zip`` heuristic, but honouring the stored dtype).
* Zip members' declared sizes are checked before anything is inflated
  (``max_file_bytes`` in total, default 64 MiB); pickle files over that size
  are refused before being opened.

Which tensor is used, in order (ComfyUI's ``load_embed``): ``string_to_param``
(A1111), a list of dicts (rows of the right width concatenated), the
``embed_key`` entry (``clip_l``, ``clip_g``), LoRA-bundled
``bundle_emb.*.string_to_param.*`` then ``bundle_emb.*.<embed_key>``, else the
first value (diffusers ``{token: t}``).

A file is refused, with a reason naming it, when it is unreadable or corrupt
(the OS, zip, pickle or safetensors error is quoted), holds no tensor, has a
non-floating dtype, rank above 2, no values, non-finite values, values beyond
:data:`MAX_ABS_VALUE`, or a width other than the encoder's.

**The value bound.** An embedding vector goes into the encoder's residual
stream unchanged (token embedding plus position embedding) and through
every layer's LayerNorm. In float16 compute a value is infinite past
65504, and the residual stream adds each layer's attention and MLP output
to it; in float32 and bfloat16 (whose LayerNorm accumulates in float32) the
LayerNorm's squared deviation ``(x - mean)**2`` overflows float32 past
about 1.8e19 (measured on a full-size CLIP-L: 1e19 already changes the
output, 1e30 gives all-NaN conditioning, 1e5 is NaN in float16 compute).
:data:`MAX_ABS_VALUE` is 2**14 = 16384, a quarter of float16's largest
value, so an accepted embedding stays finite in every compute dtype with
room for the residual additions; trained textual inversions hold values
below about 10.
"""

from __future__ import annotations

import os
import pickletools
import zipfile
from typing import Any, Callable, Sequence

import torch

__all__ = ["MAX_ABS_VALUE", "read_embedding_file", "read_or_reason"]

#: Largest accepted ``abs(value)`` in an embedding (see the module docstring).
MAX_ABS_VALUE = 2.0 ** 14
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
}


class _Rejected(Exception):
    """Internal: a file was located but cannot be used."""


def _check_zip(path: str, limit: int) -> None:
    """Refuse zip archives whose members declare more than ``limit`` bytes."""
    with zipfile.ZipFile(path) as archive:
        total = sum(info.file_size for info in archive.infolist())
    if total > limit:
        raise _Rejected(f"{path}: zip members declare {total} bytes, above the {limit}-byte limit")


_SILENT_OPS = {"MARK", "PROTO", "FRAME", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "STOP"}


def _pickle_storages(data: bytes) -> list[tuple[str, torch.dtype]]:
    """Storage keys and dtypes named in a torch pickle, read without executing it.

    Only the opcode stream is read: strings, globals and memo references are
    tracked so that torch's persistent ids ``('storage', <global torch
    XStorage>, key, location, numel)`` can be recognised.
    """
    storages: list[tuple[str, torch.dtype]] = []
    recent: list[Any] = []  # values pushed recently, newest last
    memo: dict[int, Any] = {}
    for opcode, arg, _pos in pickletools.genops(data):
        name = opcode.name
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else int(arg)] = recent[-1] if recent else None
        if name in _SILENT_OPS:
            continue
        if name == "GLOBAL":
            value: Any = ("global", str(arg).replace("\n", " "))
        elif name == "STACK_GLOBAL":
            parts = [str(x) for x in recent[-2:]]
            del recent[-2:]
            value = ("global", " ".join(parts))
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            value = memo.get(int(arg))
        elif name in ("BINPERSID", "PERSID"):
            _collect_storage(recent, storages)
            value = None
        else:
            value = arg if isinstance(arg, str) else None
        recent.append(value)
        del recent[:-8]
    return storages


def _collect_storage(recent: list[Any], storages: list[tuple[str, torch.dtype]]) -> None:
    """Record the storage named by the persistent id that ends ``recent``."""
    for index in range(len(recent) - 3, -1, -1):
        if recent[index] != "storage":
            continue
        kind, key = recent[index + 1], recent[index + 2]
        if isinstance(kind, tuple) and isinstance(key, str):
            dtype = _STORAGE_DTYPES.get(kind[1].split(" ")[-1].split(".")[-1])
            if dtype is not None:
                storages.append((key, dtype))
        return


def _read_zip_storages(path: str, width: int, limit: int) -> torch.Tensor:
    """The fallback reader: raw storages of a torch zip, no unpickling."""
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [n for n in infos if n.endswith("data.pkl")]
        if not pickles or infos[pickles[0]].file_size > limit:
            raise _Rejected(f"{path}: not a torch archive with a readable data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        storages = _pickle_storages(archive.read(pickles[0]))
        for key, dtype in reversed(storages):
            info = infos.get(f"{prefix}data/{key}")
            if info is None or info.file_size > limit:
                continue
            with archive.open(info) as member:
                raw = member.read(info.file_size + 1)
            itemsize = torch.empty((), dtype=dtype).element_size()
            count = len(raw) // itemsize
            if count and count % width == 0:
                return torch.frombuffer(bytearray(raw[: count * itemsize]), dtype=dtype).reshape(-1, width)
    raise _Rejected(f"{path}: no float storage of width {width} found by the safe zip reader")


def _load_pickle(path: str, width: int, limit: int) -> Any:
    size = os.path.getsize(path)
    if size > limit:
        raise _Rejected(f"{path}: {size} bytes, above the {limit}-byte limit for pickle files")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        _check_zip(path, limit)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises many types for refused pickles
        if not is_zip:
            raise _Rejected(f"{path}: torch.load(weights_only=True) failed: {error}") from error
    return _read_zip_storages(path, width, limit)


def _select(keys: Sequence[Any], get: Callable[[Any], Any], width: int, embed_key: str | None, *,
            any_width: bool = False) -> Any:
    """ComfyUI's choice of tensor among a file's entries."""
    if "string_to_param" in keys:
        params = get("string_to_param")
        return next(iter(params.values())) if isinstance(params, dict) and params else params
    flat = [k for k in keys if isinstance(k, str) and k.startswith("string_to_param.")]
    if flat:
        return get(flat[0])
    if embed_key is not None and embed_key in keys:
        return get(embed_key)
    for suffix in (".string_to_param.*", f".{embed_key}"):
        bundled = [k for k in keys if isinstance(k, str) and k.startswith("bundle_emb.") and k.endswith(suffix)]
        if bundled:
            return torch.cat([_as_rows(get(k), width, any_width=any_width) for k in bundled], dim=0)
    if not keys:
        raise _Rejected("the file holds no entries")
    return get(keys[0])


def _from_list(items: list, width: int) -> torch.Tensor:
    rows = []
    for item in items:
        values = item.values() if isinstance(item, dict) else [item]
        rows += [v.reshape(-1, width) for v in values if isinstance(v, torch.Tensor) and v.ndim and v.shape[-1] == width]
    if not rows:
        raise _Rejected(f"the list holds no tensor of width {width}")
    return torch.cat(rows, dim=0)


def _as_rows(value: Any, width: int, *, any_width: bool = False) -> torch.Tensor:
    """Validate one candidate and return it as ``[n, width]`` (``any_width``: ``[n, its own width]``)."""
    if not isinstance(value, torch.Tensor):
        raise _Rejected(f"expected a tensor, found {type(value).__name__}")
    if not value.is_floating_point():
        raise _Rejected(f"expected floating point values, found {value.dtype}")
    if value.ndim > 2 or value.ndim == 0:
        raise _Rejected(f"expected a 1-D or 2-D tensor, found shape {tuple(value.shape)}")
    if value.ndim == 2 and value.shape[0] == 0:  # no vectors: ComfyUI's empty group, whatever the width
        return value.new_zeros((0, width))
    rows = value.reshape(1, -1) if value.ndim == 1 else value
    if rows.numel() == 0:
        raise _Rejected("the tensor is empty")
    if rows.shape[1] != width and not any_width:
        raise _Rejected(f"width {rows.shape[1]} does not match the text encoder's {width}")
    if not bool(torch.isfinite(rows).all()):
        raise _Rejected("the tensor holds NaN or infinite values")
    return rows


def _check_magnitude(rows: torch.Tensor, max_abs: float) -> torch.Tensor:
    if rows.numel() == 0:
        return rows
    largest = float(rows.abs().max())
    if largest > max_abs:
        raise _Rejected(f"holds a value of magnitude {largest:.3g}, above the {max_abs:g} limit that keeps the "
                        "encoder finite in every compute dtype (the file is corrupt or was trained wrongly)")
    return rows


def read_embedding_file(path: str, width: int, embed_key: str | None, limit: int, *,
                        max_abs: float = MAX_ABS_VALUE, any_width: bool = False) -> torch.Tensor:
    """Read and validate one embedding file.

    ``any_width``: keep a tensor whatever its width, as ComfyUI's ``load_embed`` does (``width``
    then only picks rows in list files and the zip fallback); the encoder drops vectors of the
    wrong width when it encodes, padding the end (T5 parts, ComfyUI's rule).

    Raises:
        _Rejected: the file cannot be used; the message names the path and why
            (:func:`read_or_reason` returns that message instead).
    """
    try:
        return _check_magnitude(_read_rows(path, width, embed_key, limit, any_width), max_abs)
    except _Rejected as error:
        message = str(error)
        raise _Rejected(message if path in message else f"{path}: {message}") from None


def _read_rows(path: str, width: int, embed_key: str | None, limit: int, any_width: bool = False) -> torch.Tensor:
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open  # light, but only needed here

            with safe_open(path, framework="pt", device="cpu") as handle:
                keys = list(handle.keys())
                return _as_rows(_select(keys, handle.get_tensor, width, embed_key, any_width=any_width), width,
                                any_width=any_width)
        loaded = _load_pickle(path, width, limit)
        if isinstance(loaded, torch.Tensor):
            return _as_rows(loaded, width, any_width=any_width)
        if isinstance(loaded, list):
            return _as_rows(_from_list(loaded, width), width)
        if isinstance(loaded, dict):
            return _as_rows(_select(list(loaded), loaded.__getitem__, width, embed_key, any_width=any_width), width,
                            any_width=any_width)
        raise _Rejected(f"expected a tensor or a dict, found {type(loaded).__name__}")
    except _Rejected as error:
        message = str(error)
        raise _Rejected(message if path in message else f"{path}: {message}") from None
    except Exception as error:  # OSError, zipfile.BadZipFile, SafetensorsError, ...
        raise _Rejected(f"{path}: cannot be read ({type(error).__name__}: {error})") from error


def read_or_reason(path: str, embedding_size: int, embed_key: str | None,
                   max_file_bytes: int, max_abs: float = MAX_ABS_VALUE, *,
                   any_width: bool = False) -> torch.Tensor | str:
    """The ``[n, embedding_size]`` vectors of a valid file, or the reason (naming ``path``)
    it is refused; never raises for a bad file (the loader caches either answer)."""
    try:
        return read_embedding_file(path, embedding_size, embed_key, max_file_bytes, max_abs=max_abs,
                                   any_width=any_width)
    except _Rejected as error:
        return str(error)
