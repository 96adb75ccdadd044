"""Textual-inversion embeddings: found safely, read without running pickles.

Lookup follows ComfyUI's ``load_embed`` (``comfy/sd1_clip.py``): each
embedding folder and its subfolders are searched, the name may be given with
or without an extension, and ``.safetensors``, ``.pt`` and ``.bin`` are tried
in that order. Unlike ComfyUI:

* Names are refused (result ``rejected``, never opened) when they are empty,
  ``.``/``..``, absolute, contain a ``..`` component or a NUL, or when the file
  they resolve to (``os.path.realpath`` *after* the extension is added, so
  symlinks are followed) lies outside the embedding folder it was found in.
  Symlinked subfolders are not walked.
* A name with an extension is only taken as-is for the three known ones.
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

Which tensor is used, in order: ``string_to_param`` (A1111), a list of dicts
(rows of the right width concatenated), the ``embed_key`` entry (``clip_l``,
``clip_g``), LoRA-bundled ``bundle_emb.*.string_to_param.*`` then
``bundle_emb.*.<embed_key>``, else the first value (diffusers ``{token: t}``).

Result statuses: ``found``; ``missing``, whose reason says which of three
cases it is: no embedding directory was given, the directory does not exist,
or there is no such name in it (with the closest names, by :mod:`difflib`);
``rejected`` with a reason: unsafe name or symlink, unreadable/corrupt file
(the OS, zip, pickle or safetensors error is quoted with the path), no tensor,
non-floating dtype, rank above 2, empty, non-finite values, values beyond
:data:`MAX_ABS_VALUE`, or width != ``embedding_size``.

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
The tokenizer turns ``missing`` and ``rejected`` into an
:class:`~textenc.errors.EmbeddingWarning` and goes on with the prompt.
"""

from __future__ import annotations

import difflib
import os
import pickletools
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from textenc.errors import EmbeddingError
from textenc.lru import LRUCache
from textenc.paths import is_inside

__all__ = ["EmbeddingResult", "EmbeddingLoader", "load_embed", "EXTENSIONS", "MAX_ABS_VALUE",
           "NO_DIRECTORY"]

EXTENSIONS = (".safetensors", ".pt", ".bin")
#: Largest accepted ``abs(value)`` in an embedding (see the module docstring).
MAX_ABS_VALUE = 2.0 ** 14
NO_DIRECTORY = "no embedding directory was given"
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
}


@dataclass(frozen=True)
class EmbeddingResult:
    """Outcome of looking an embedding up.

    Attributes:
        name: the name as written in the prompt.
        status: ``"found"``, ``"missing"`` or ``"rejected"``.
        vectors: ``[n_vectors, width]`` tensor when found, else None.
        path: the resolved file, when one was located.
        reason: why it is missing or rejected ("" when found).
    """

    name: str
    status: str
    vectors: torch.Tensor | None = None
    path: str | None = None
    reason: str = ""


class _Rejected(Exception):
    """Internal: a file was located but cannot be used."""


def _unsafe_name(name: str) -> str:
    """Reason why a name may not be used as a relative path, or ""."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.strip() in (".", ".."):
        return "empty name or '.'/'..'"
    if "\0" in name:
        return "name contains a NUL character"
    if os.path.isabs(name) or name.startswith(("/", "\\")) or os.path.splitdrive(name)[0]:
        return "absolute paths are not allowed"
    if ".." in parts:
        return "'..' is not allowed in embedding names"
    return ""


def _folders(root: str) -> list[str]:
    """The root and its subfolders (symlinked folders are not followed), sorted."""
    found = [root]
    for current, subdirs, _files in os.walk(root, followlinks=False):
        subdirs.sort()
        found.extend(os.path.join(current, d) for d in subdirs)
    return found


def locate(name: str, directories: Sequence[str]) -> tuple[str | None, str]:
    """Find the file for ``name``; returns ``(realpath, "")`` or ``(None, reason)``."""
    reason = _unsafe_name(name)
    if reason:
        return None, reason
    has_ext = name.lower().endswith(EXTENSIONS)
    suffixes = ("",) if has_ext else EXTENSIONS
    refusal = ""
    for directory in directories:
        root = os.path.realpath(directory)
        if not os.path.isdir(root):
            continue
        for folder in _folders(root):
            for suffix in suffixes:
                candidate = os.path.join(folder, name + suffix)
                if not os.path.lexists(candidate):
                    continue
                real = os.path.realpath(candidate)
                if not is_inside(root, real):
                    refusal = f"{candidate} resolves to {real}, outside the embedding folder {root}"
                elif os.path.isfile(real):
                    return real, ""
    return None, refusal


def _available_names(roots: Sequence[str]) -> list[str]:
    """Relative names (without extension) of the embedding files below ``roots``."""
    names = set()
    for root in roots:
        for folder in _folders(root):
            if os.path.islink(folder) or not is_inside(root, os.path.realpath(folder)):
                continue  # symlinked folders are never searched, so never listed
            try:
                entries = os.listdir(folder)
            except OSError:
                continue
            for entry in entries:
                stem, ext = os.path.splitext(entry)
                if ext.lower() in EXTENSIONS:
                    names.add(os.path.relpath(os.path.join(folder, stem), root).replace(os.sep, "/"))
    return sorted(names)


def missing_reason(name: str, directories: Sequence[str]) -> str:
    """Why ``name`` was not found: no directory, directories that do not exist, or no such
    name in them (with the closest names).

    >>> missing_reason("x", [])
    'no embedding directory was given'
    """
    if not directories:
        return NO_DIRECTORY
    existing = [d for d in directories if os.path.isdir(d)]
    absent = "; ".join(f"directory {d!r} does not exist" for d in directories if d not in existing)
    if not existing:
        return f"embedding {absent}"
    close = difflib.get_close_matches(name, _available_names([os.path.realpath(d) for d in existing]), n=3)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    where = ", ".join(repr(d) for d in existing)
    return f"no embedding named {name!r} in {where}{hint}" + (f"; {absent}" if absent else "")


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


def _select(keys: Sequence[Any], get: Callable[[Any], Any], width: int, embed_key: str | None) -> Any:
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
            return torch.cat([_as_rows(get(k), width) for k in bundled], dim=0)
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


def _as_rows(value: Any, width: int) -> torch.Tensor:
    """Validate one candidate and return it as ``[n, width]``."""
    if not isinstance(value, torch.Tensor):
        raise _Rejected(f"expected a tensor, found {type(value).__name__}")
    if not value.is_floating_point():
        raise _Rejected(f"expected floating point values, found {value.dtype}")
    if value.ndim > 2 or value.ndim == 0:
        raise _Rejected(f"expected a 1-D or 2-D tensor, found shape {tuple(value.shape)}")
    rows = value.reshape(1, -1) if value.ndim == 1 else value
    if rows.numel() == 0:
        raise _Rejected("the tensor is empty")
    if rows.shape[1] != width:
        raise _Rejected(f"width {rows.shape[1]} does not match the text encoder's {width}")
    if not bool(torch.isfinite(rows).all()):
        raise _Rejected("the tensor holds NaN or infinite values")
    return rows


def _check_magnitude(rows: torch.Tensor, max_abs: float) -> torch.Tensor:
    largest = float(rows.abs().max())
    if largest > max_abs:
        raise _Rejected(f"holds a value of magnitude {largest:.3g}, above the {max_abs:g} limit that keeps the "
                        "encoder finite in every compute dtype (the file is corrupt or was trained wrongly)")
    return rows


def read_embedding_file(path: str, width: int, embed_key: str | None, limit: int, *,
                        max_abs: float = MAX_ABS_VALUE) -> torch.Tensor:
    """Read and validate one embedding file. Raises ``_Rejected`` with the path."""
    try:
        return _check_magnitude(_read_rows(path, width, embed_key, limit), max_abs)
    except _Rejected as error:
        message = str(error)
        raise _Rejected(message if path in message else f"{path}: {message}") from None


def _read_rows(path: str, width: int, embed_key: str | None, limit: int) -> torch.Tensor:
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open  # light, but only needed here

            with safe_open(path, framework="pt", device="cpu") as handle:
                keys = list(handle.keys())
                return _as_rows(_select(keys, handle.get_tensor, width, embed_key), width)
        loaded = _load_pickle(path, width, limit)
        if isinstance(loaded, torch.Tensor):
            return _as_rows(loaded, width)
        if isinstance(loaded, list):
            return _as_rows(_from_list(loaded, width), width)
        if isinstance(loaded, dict):
            return _as_rows(_select(list(loaded), loaded.__getitem__, width, embed_key), width)
        raise _Rejected(f"expected a tensor or a dict, found {type(loaded).__name__}")
    except _Rejected as error:
        message = str(error)
        raise _Rejected(message if path in message else f"{path}: {message}") from None
    except Exception as error:  # OSError, zipfile.BadZipFile, SafetensorsError, ...
        raise _Rejected(f"{path}: cannot be read ({type(error).__name__}: {error})") from error


class EmbeddingLoader:
    """Looks embeddings up and caches them; one per tokenizer, thread-safe.

    Args:
        directories: a folder or a list of folders.
        embedding_size: expected width (768 for SD1 CLIP-L, 1024 SD2, 1280 CLIP-G).
        embed_key: key chosen in multi-encoder files (``"clip_l"``, ``"clip_g"``).
        max_file_bytes: limit for pickle files and declared zip contents.
        max_abs_value: largest accepted magnitude (default :data:`MAX_ABS_VALUE`).
        cache_size: number of files kept (keyed by path, size and mtime).
    """

    def __init__(self, directories: str | os.PathLike | Sequence[str | os.PathLike] | None, embedding_size: int, *,
                 embed_key: str | None = None, max_file_bytes: int = 64 << 20,
                 max_abs_value: float = MAX_ABS_VALUE, cache_size: int = 64) -> None:
        if directories is None:
            directories = []
        elif isinstance(directories, (str, os.PathLike)):
            directories = [directories]
        self.directories = [os.fspath(d) for d in directories]
        self.embedding_size = embedding_size
        self.embed_key = embed_key
        self.max_file_bytes = max_file_bytes
        self.max_abs_value = max_abs_value
        self.cache_size = cache_size
        self._cache = LRUCache(cache_size)  # (realpath, size, mtime, width, key) -> tensor or reason

    def lookup(self, name: str) -> EmbeddingResult:
        """Find, read and validate ``name``; never raises for a bad file."""
        path, reason = locate(name, self.directories)
        if path is None and reason:
            return EmbeddingResult(name, "rejected", reason=reason)
        if path is None:
            return EmbeddingResult(name, "missing", reason=missing_reason(name, self.directories))
        try:
            stat = os.stat(path)
        except OSError as error:
            return EmbeddingResult(name, "rejected", path=path, reason=f"{path}: {error}")
        key = (path, stat.st_size, stat.st_mtime_ns, self.embedding_size, self.embed_key, self.max_abs_value)
        cached = self._cache.get_or_compute(
            key, lambda: _read_or_reason(path, self.embedding_size, self.embed_key, self.max_file_bytes,
                                         self.max_abs_value))
        if isinstance(cached, str):
            return EmbeddingResult(name, "rejected", path=path, reason=cached)
        return EmbeddingResult(name, "found", vectors=cached, path=path)


def _read_or_reason(path: str, embedding_size: int, embed_key: str | None,
                    max_file_bytes: int, max_abs: float) -> torch.Tensor | str:
    """The vectors of a valid file, or the reason it was rejected (both are cached)."""
    try:
        return read_embedding_file(path, embedding_size, embed_key, max_file_bytes, max_abs=max_abs)
    except _Rejected as error:
        return str(error)


def load_embed(embedding_name: str, embedding_directory: str | Sequence[str] | None, embedding_size: int,
               embed_key: str | None = None) -> torch.Tensor | None:
    """ComfyUI-compatible loader: ``[n, width]`` tensor, or None when missing.

    Raises:
        EmbeddingError: the file exists but is unsafe or unusable (reason given).
    """
    result = EmbeddingLoader(embedding_directory, embedding_size, embed_key=embed_key).lookup(embedding_name)
    if result.status == "found":
        return result.vectors
    if result.status == "missing":
        return None
    raise EmbeddingError(f"embedding {embedding_name!r} refused: {result.reason}")
