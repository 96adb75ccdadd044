"""Read caption datasets for :mod:`textenc.dataset` into rows of ``(id, caption)``.

Supported inputs (see :func:`read_captions`):

* parquet: one file, a folder of ``*.parquet`` files or a glob (files sorted by path);
* ``.jsonl``: one JSON object per non-blank line;
* ``.txt``: one caption per line (an empty line is an empty caption);
* a folder of per-image ``.txt`` caption files (kohya layout), id = relative path
  without the extension.

A row that cannot be read (not UTF-8, bad JSON, a null caption, an id or caption
holding a lone surrogate, which UTF-8 cannot store) keeps its position and is
recorded in :attr:`CaptionRows.rejected` with the reason, so
shard ``i`` always covers input rows ``[i·N, (i+1)·N)``. Problems with the
input as a whole (missing file or column, no rows, duplicate ids) raise
:class:`~textenc.errors.DatasetError`.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any

from ..errors import DatasetError, TextencWarning

__all__ = ["CaptionRows", "read_captions", "input_kind"]


@dataclasses.dataclass
class CaptionRows:
    """All rows of an input, in input order.

    Attributes:
        ids: one id per row (int, or str for kohya / string id columns).
        texts: the caption, or None for a row that could not be read.
        rejected: row index → reason, for rows whose ``texts`` entry is None.
        skipped: files of a caption folder that are not rows (``{"path", "reason"}``).
    """

    ids: list[Any]
    texts: list[str | None]
    rejected: dict[int, str]
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def digest(self) -> str:
        """sha256 over every id and caption: detects a changed input on re-runs."""
        hasher = hashlib.sha256()
        for row_id, text in zip(self.ids, self.texts):
            hasher.update(json.dumps([row_id, text], ensure_ascii=False).encode("utf-8", "surrogatepass"))
            hasher.update(b"\n")
        return hasher.hexdigest()


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})"


def _parquet_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*.parquet"))
    elif any(ch in path for ch in "*?["):
        files = sorted(globlib.glob(path, recursive=True))
    else:
        files = [path]
    if not files:
        raise DatasetError(f"{path}: no parquet files found")
    return files


def input_kind(path: str | os.PathLike) -> str:
    """``"parquet"``, ``"jsonl"``, ``"txt"`` or ``"kohya"`` for an INPUT argument."""
    text = os.fspath(path)
    if os.path.isdir(text):
        return "parquet" if any(Path(text).rglob("*.parquet")) else "kohya"
    if any(ch in text for ch in "*?[") and not os.path.exists(text):
        return "parquet"
    if not os.path.exists(text):
        raise DatasetError(f"{text}: no such file or folder")
    suffix = Path(text).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".txt":
        return "txt"
    raise DatasetError(f"{text}: unknown input type {suffix!r}; expected .parquet, .jsonl, .txt "
                       "or a folder of parquet or kohya .txt caption files")


def _require_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DatasetError("reading parquet needs pyarrow: pip install 'textenc[ray]' "
                           "(or pip install pyarrow)") from exc
    return pq


def _read_parquet(path: str, column: str, id_column: str | None) -> CaptionRows:
    pq = _require_pyarrow()
    rows = CaptionRows([], [], {})
    wanted = [column] + ([id_column] if id_column else [])
    for file in _parquet_files(path):
        # The schema first: a missing column is named before any data is read.
        try:
            names = pq.read_schema(file).names
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DatasetError(f"{file}: cannot read parquet: {exc}") from exc
        missing = [name for name in wanted if name not in names]
        if missing:
            raise DatasetError(f"{file}: no column {missing[0]!r}; columns are {names} "
                               "(choose one with --column / --id-column)")
        try:
            table = pq.read_table(file, columns=wanted)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{file}: cannot read parquet: {exc}") from exc
        texts = table.column(column).to_pylist()
        ids = table.column(id_column).to_pylist() if id_column else [None] * len(texts)
        for row_id, value in zip(ids, texts):
            _append(rows, row_id, value)
    return rows


def _not_unicode(what: str, text: Any) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (a lone surrogate, from a JSON escape such as
    ``"\\ud800"`` or an undecodable file name), or None."""
    if not isinstance(text, str):
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"{what} is not valid Unicode (lone surrogate U+{ord(text[exc.start]):04X} "
                f"at character {exc.start})")
    return None


def _append(rows: CaptionRows, row_id: Any, value: Any) -> None:
    index = len(rows.ids)
    rows.ids.append(index if row_id is None else row_id)
    reason = _not_unicode("id", row_id)
    if isinstance(value, (bytes, bytearray)):
        value, decode_reason = _decode(bytes(value))
        reason = reason or decode_reason
    elif value is None:
        reason = reason or "caption is null"
    elif not isinstance(value, str):
        value, reason = None, reason or f"caption is a {type(value).__name__}, not a string"
    reason = reason or _not_unicode("caption", value)
    rows.texts.append(None if reason is not None else value)
    if reason is not None:
        rows.rejected[index] = reason


#: How many distinct keys of a JSONL file a missing-column error lists.
_KEYS_SHOWN = 20


def _read_jsonl(path: str, column: str, id_column: str | None) -> CaptionRows:
    rows = CaptionRows([], [], {})
    seen_column, seen_id, keys = False, id_column is None, {}
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            text, reason = _decode(raw)
            record: Any = None
            if text is not None:
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    reason = f"invalid JSON: {exc.msg}"
            if record is not None and not isinstance(record, dict):
                record, reason = None, "line is not a JSON object"
            if record is not None and len(keys) < _KEYS_SHOWN:
                keys.update(dict.fromkeys(list(record)[:_KEYS_SHOWN]))
            seen_id = seen_id or (record is not None and id_column in record)
            if record is not None and column not in record:
                record, reason = None, f"no {column!r} key"
            seen_column = seen_column or record is not None
            row_id = record.get(id_column) if record is not None and id_column else None
            _append(rows, row_id, record.get(column) if record is not None else None)
            if reason is not None:
                rows.texts[-1] = None
                rows.rejected[len(rows.ids) - 1] = reason
    for name, seen, option in ((column, seen_column, "--column"), (id_column, seen_id, "--id-column")):
        if rows.ids and not seen:
            raise DatasetError(f"{path}: no line has the column {name!r}; columns are {list(keys)[:_KEYS_SHOWN]} "
                               f"(choose one with {option})")
    return rows


def _read_txt(path: str) -> CaptionRows:
    with open(path, "rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline ending the last line does not start a row
    rows = CaptionRows([], [], {})
    for raw in lines:
        _append(rows, None, raw.rstrip(b"\r"))
    return rows


def _not_a_caption_file(file: Path, root: Path) -> str | None:
    """Why ``file`` (found under the caption folder ``root``) is skipped, or None to read it."""
    real = os.path.realpath(file)
    root_real = os.path.realpath(root)
    if os.path.commonpath([real, root_real]) != root_real:
        return f"resolves to {real}, outside the caption folder {root}"
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        return f"cannot be opened ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "a directory, not a caption file"
    if not stat.S_ISREG(mode):
        return "not a regular file (a FIFO, socket or device)"
    return None


def _read_kohya(path: str) -> CaptionRows:
    """Every ``*.txt`` under ``path`` (symlinked subfolders are not walked). Directories,
    special files and symlinks resolving outside ``path`` are skipped with a warning and
    listed in :attr:`CaptionRows.skipped`; they are not rows."""
    root = Path(path)
    files = sorted(root.rglob("*.txt"), key=lambda p: p.relative_to(root).as_posix())
    rows = CaptionRows([], [], {})
    for file in files:
        name = file.relative_to(root).as_posix()
        reason = _not_a_caption_file(file, root)
        if reason is not None:
            warnings.warn(f"{file}: skipped, {reason}", TextencWarning, stacklevel=3)
            rows.skipped.append({"path": name, "reason": reason})
            continue
        unreadable = None
        try:
            value: Any = file.read_bytes().strip()
        except OSError as exc:  # a caption file that exists but cannot be read: a bad row
            value, unreadable = None, f"cannot read {name} ({exc.strerror})"
        _append(rows, file.relative_to(root).with_suffix("").as_posix(), value)
        if unreadable is not None:
            rows.rejected[len(rows.ids) - 1] = unreadable
    return rows


def _check_ids(rows: CaptionRows, source: str) -> None:
    seen: dict[Any, int] = {}
    for index, row_id in enumerate(rows.ids):
        if row_id is None or isinstance(row_id, (float, bool)) or not isinstance(row_id, (int, str)):
            raise DatasetError(f"{source}: row {index} has id {row_id!r}; ids must be integers or strings")
        if row_id in seen:
            raise DatasetError(f"{source}: id {row_id!r} appears at rows {seen[row_id]} and {index}; "
                               "ids must be unique (pick another --id-column)")
        seen[row_id] = index


def read_captions(path: str | os.PathLike, *, column: str = "text", id_column: str | None = None,
                  limit: int | None = None) -> CaptionRows:
    """Read every row of a caption dataset (see the module docstring for formats).

    Args:
        path: parquet file/folder/glob, ``.jsonl``, ``.txt`` or kohya folder.
        column: caption column (parquet, jsonl).
        id_column: id column (parquet, jsonl); default: the row index.
        limit: keep only the first ``limit`` rows.

    Raises:
        DatasetError: missing path or column, no rows, bad or duplicate ids.
    """
    source = os.fspath(path)
    kind = input_kind(source)
    if kind == "parquet":
        rows = _read_parquet(source, column, id_column)
    elif kind == "jsonl":
        rows = _read_jsonl(source, column, id_column)
    elif column != "text" or id_column is not None:
        raise DatasetError(f"{source}: a {kind} input has no columns (one caption per "
                           f"{'line' if kind == 'txt' else 'file'}); --column and --id-column are for parquet "
                           "and jsonl input")
    elif kind == "txt":
        rows = _read_txt(source)
    else:
        rows = _read_kohya(source)
    if limit is not None:
        rows = CaptionRows(rows.ids[:limit], rows.texts[:limit],
                           {k: v for k, v in rows.rejected.items() if k < limit}, rows.skipped)
    if not rows.ids:
        raise DatasetError(f"{source}: no caption rows ({kind} input is empty)")
    _check_ids(rows, source)
    return rows
