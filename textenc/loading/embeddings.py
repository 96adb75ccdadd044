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
* Files are read by :mod:`textenc.loading.embedding_file`: ``torch.load`` only with
  ``weights_only=True`` (a zip fallback reads storages without unpickling),
  sizes checked before anything is inflated, and values bounded by
  :data:`MAX_ABS_VALUE` (why that bound: see that module).

Result statuses: ``found``; ``missing``, whose reason says which of three
cases it is: no embedding directory was given, the directory does not exist,
or there is no such name in it (with the closest names, by :mod:`difflib`);
``rejected`` with a reason: unsafe name or symlink, unreadable/corrupt file
(the OS, zip, pickle or safetensors error is quoted with the path), no tensor,
non-floating dtype, rank above 2, empty (but a 2-D tensor with no rows is
``found`` with no vectors, as in ComfyUI, where it still uses a word id),
non-finite values, values beyond :data:`MAX_ABS_VALUE`, or width != ``embedding_size``.
The tokenizer turns ``missing`` and ``rejected`` into an
:class:`~textenc.errors.EmbeddingWarning` and goes on with the prompt.
"""

from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass
from typing import Sequence

import torch

# read_embedding_file is re-exported: it was defined here before the file reader had a module of its own.
from textenc.loading.embedding_file import MAX_ABS_VALUE, read_embedding_file, read_or_reason  # noqa: F401
from textenc.errors import EmbeddingError
from textenc.lru import LRUCache
from textenc.loading.paths import is_inside

__all__ = ["EmbeddingResult", "EmbeddingLoader", "load_embed", "EXTENSIONS", "MAX_ABS_VALUE",
           "NO_DIRECTORY"]

EXTENSIONS = (".safetensors", ".pt", ".bin")
NO_DIRECTORY = "no embedding directory was given"
#: Missing names an :class:`EmbeddingLoader` remembers (a few hundred bytes each).
MISSES_KEPT = 4096
_SETTLE_NS = 2_000_000_000


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


def _stamp(path: str) -> int | None:
    """``path``'s mtime in ns, None when it cannot be read."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _settled(state: tuple) -> bool:
    """Whether no folder changed in the last second: a change within a file system's
    time granularity (up to 2 s on FAT, a few ms on ext4) may leave its mtime as it
    was, so misses are remembered only for folders older than that (as git does)."""
    recent = time.time_ns() - _SETTLE_NS
    return all(stamp is not None and stamp < recent for _root, stamps in state for stamp in stamps)


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


class EmbeddingLoader:
    """Looks embeddings up and caches them; one per tokenizer, thread-safe.

    Args:
        directories: a folder or a list of folders.
        embedding_size: expected width (768 for SD1 CLIP-L, 1024 SD2, 1280 CLIP-G).
        embed_key: key chosen in multi-encoder files (``"clip_l"``, ``"clip_g"``).
        max_file_bytes: limit for pickle files and declared zip contents.
        max_abs_value: largest accepted magnitude (default :data:`MAX_ABS_VALUE`).
        cache_size: number of files kept (keyed by path, size and mtime).
        any_width: keep vectors of any width, as ComfyUI's ``load_embed`` (T5 parts: their
            encoder drops the wrong width at encode and pads the end, as ComfyUI's);
            otherwise a file of another width is refused (CLIP parts, a deliberate difference).

    Names found missing (or refused by name) are remembered too, up to
    :data:`MISSES_KEPT`, while the folders stay as they were: every lookup stats
    each folder once (its mtime changes when a file or subfolder is added, removed
    or renamed in it) and forgets the misses when one changed (misses in a folder
    changed in the last 2 s are not remembered: its mtime may not show a change
    made within the file system's time granularity). Without this each
    miss walked the folders and ranked every name by similarity again (~0.7 ms).
    """

    def __init__(self, directories: str | os.PathLike | Sequence[str | os.PathLike] | None, embedding_size: int, *,
                 embed_key: str | None = None, max_file_bytes: int = 64 << 20,
                 max_abs_value: float = MAX_ABS_VALUE, cache_size: int = 64, any_width: bool = False) -> None:
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
        self.any_width = any_width
        self._cache = LRUCache(cache_size)  # (realpath, size, mtime, width, key) -> tensor or reason
        self._misses = LRUCache(MISSES_KEPT)  # (folder state, name) -> EmbeddingResult
        self._walked: dict[str, list[str]] = {}  # root -> its folders at the last walk
        self._stamps: dict[str, tuple] = {}  # root -> those folders' mtimes then

    def folder_state(self) -> tuple:
        """Each root's folders' mtimes (None: unreadable); re-walked when one changed.
        :meth:`lookup` keys its remembered misses by it."""
        state = []
        for directory in self.directories:
            root = os.path.realpath(directory)
            folders = self._walked.get(root)
            stamps = tuple(map(_stamp, folders)) if folders else None
            if stamps is None or stamps != self._stamps.get(root):
                folders = self._walked[root] = _folders(root) if os.path.isdir(root) else [root]
                stamps = self._stamps[root] = tuple(map(_stamp, folders))
            state.append((root, stamps))
        return tuple(state)

    def lookup(self, name: str, *, folder_state: tuple | None = None) -> EmbeddingResult:
        """Find, read and validate ``name``; never raises for a bad file.

        ``folder_state``: :meth:`folder_state` taken once for several lookups (a prompt's),
        instead of once per lookup (a realpath and a stat per folder each time).
        """
        miss_key = (folder_state if folder_state is not None else self.folder_state(), name)
        miss = self._misses.get(miss_key)
        if miss is not None:
            return miss
        path, reason = locate(name, self.directories)
        if path is None:
            miss = EmbeddingResult(name, "rejected", reason=reason) if reason else \
                EmbeddingResult(name, "missing", reason=missing_reason(name, self.directories))
            if _settled(miss_key[0]):
                self._misses.put(miss_key, miss)
            return miss
        try:
            stat = os.stat(path)
        except OSError as error:
            return EmbeddingResult(name, "rejected", path=path, reason=f"{path}: {error}")
        key = (path, stat.st_size, stat.st_mtime_ns, self.embedding_size, self.embed_key, self.max_abs_value,
               self.any_width)
        cached = self._cache.get_or_compute(
            key, lambda: read_or_reason(path, self.embedding_size, self.embed_key, self.max_file_bytes,
                                        self.max_abs_value, any_width=self.any_width))
        if isinstance(cached, str):
            return EmbeddingResult(name, "rejected", path=path, reason=cached)
        return EmbeddingResult(name, "found", vectors=cached, path=path)


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
