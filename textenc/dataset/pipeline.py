"""Shard planning, the tokenize → encode → write pipeline and the shard writer.

Both engines of :mod:`textenc.dataset` run :func:`run_shards`: the local engine
over every shard left to do, each Ray actor over the one shard it was handed.
A background thread tokenizes and groups captions by window count into a
bounded queue while the calling thread runs the model and writes shards, so
the model does not wait for the tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .encode import CaptionEncoder, Tokenized
from .format import FORMAT_VERSION, shard_name, write_safetensors
from .inputs import CaptionRows

__all__ = ["ShardJob", "ShardContext", "plan_shards", "run_shards", "shard_record_histogram"]

_QUEUE_BATCHES = 8


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """Shard ``index`` covers input rows ``[start, stop)``."""

    index: int
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class ShardContext:
    """Everything a shard's bytes depend on besides its rows' encodings."""

    fingerprint: str
    options_json: str
    cond_width: int
    pooled_width: int
    int_ids: bool
    window_length: int = 77
    dedup: bool = True  # encode a caption repeated within a shard once


def plan_shards(num_rows: int, shard_rows: int) -> list[ShardJob]:
    """Shard ``i`` holds input rows ``[i·N, (i+1)·N)``."""
    return [ShardJob(i, start, min(start + shard_rows, num_rows))
            for i, start in enumerate(range(0, num_rows, shard_rows))]


def shard_record_histogram(records: Sequence[dict]) -> dict[str, int]:
    """Sum the per-shard windows histograms (keys are window counts as strings)."""
    total: Counter = Counter()
    for record in records:
        total.update({int(k): v for k, v in record["windows_histogram"].items()})
    return {str(k): total[k] for k in sorted(total)}


def _put(out: queue.Queue, item: tuple, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _repeat_of(rows: CaptionRows, row: int, first_of: dict[str, int] | None) -> int | None:
    """The shard's first row with the same caption as ``row`` (None: ``row`` is the first).
    Options are the run's, so equal captions encode equally."""
    text = rows.texts[row]
    if first_of is None or text is None or row in rows.rejected:
        return None
    first = first_of.setdefault(text, row)
    return None if first == row else first


def _tokenize_job(encoder: CaptionEncoder, rows: CaptionRows, job: ShardJob, batch_size: int,
                  out: queue.Queue, stop: threading.Event, dedup: bool) -> bool:
    groups: dict[tuple, list[Tokenized]] = {}
    rejected: dict[int, str] = {}
    repeats: dict[int, int] = {}
    first_of: dict[str, int] | None = {} if dedup else None
    for row in range(job.start, job.stop):
        first = _repeat_of(rows, row, first_of)
        if first is not None:
            repeats[row] = first
            continue
        item = encoder.tokenize(row, rows.texts[row], rows.rejected.get(row))
        if item.reason is not None:
            rejected[row] = item.reason
            continue
        group = groups.setdefault(item.group_key, [])
        group.append(item)
        if len(group) >= batch_size:
            if not _put(out, ("batch", job, list(group)), stop):
                return False
            group.clear()
    for group in groups.values():
        if group and not _put(out, ("batch", job, group), stop):
            return False
    return _put(out, ("end", job, rejected, repeats), stop)


def _produce(encoder: CaptionEncoder, rows: CaptionRows, jobs: Sequence[ShardJob], batch_size: int,
             out: queue.Queue, stop: threading.Event, dedup: bool) -> None:
    try:
        for job in jobs:
            if not _tokenize_job(encoder, rows, job, batch_size, out, stop, dedup):
                return
        _put(out, ("done",), stop)
    except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread, re-raised there
        _put(out, ("error", exc), stop)


def _shard_tensors(job: ShardJob, rows: CaptionRows, kept: list[tuple[int, Any]],
                   context: ShardContext, encoder: CaptionEncoder) -> dict[str, torch.Tensor]:
    counts = [result[2] for _, result in kept]
    offsets = torch.zeros(len(kept) + 1, dtype=torch.int64)
    if kept:
        offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    tensors = {"ids": torch.tensor([rows.ids[r] if context.int_ids else r for r, _ in kept],
                                   dtype=torch.int64),
               "rows": torch.tensor([r for r, _ in kept], dtype=torch.int64),
               "window_offsets": offsets}
    dtype = encoder.out_dtype
    if encoder.settings.want_cond:
        tensors["cond"] = (torch.cat([result[0] for _, result in kept]) if kept
                           else torch.zeros(0, context.cond_width, dtype=dtype))
    tensors["pooled"] = (torch.stack([result[1] for _, result in kept]) if kept
                         else torch.zeros(0, context.pooled_width, dtype=dtype))
    return tensors


def _metadata(job: ShardJob, rows: CaptionRows, kept: list, context: ShardContext) -> dict[str, str]:
    metadata = {"format": FORMAT_VERSION, "model_fingerprint": context.fingerprint,
                "options": context.options_json, "shard": str(job.index),
                "row_start": str(job.start), "row_stop": str(job.stop),
                "window_length": str(context.window_length)}
    if not context.int_ids:
        metadata["ids"] = json.dumps([rows.ids[r] for r, _ in kept], ensure_ascii=True)
    return metadata


def write_shard(folder: str, job: ShardJob, rows: CaptionRows, results: dict[int, Any],
                rejected: dict[int, str], context: ShardContext, encoder: CaptionEncoder,
                repeats: dict[int, int] | None = None) -> dict:
    """Write one shard atomically → its manifest record. ``repeats`` maps a row to the
    earlier row of the shard with the same caption, whose encoding it reuses."""
    start = time.perf_counter()
    kept, reasons, repeats = [], dict(rejected), repeats or {}
    for row in range(job.start, job.stop):
        source = repeats.get(row, row)
        if source in reasons:
            reasons[row] = reasons[source]
            continue
        result = results[source]
        if isinstance(result, str):
            reasons[row] = result
        else:
            kept.append((row, result))
    tensors = _shard_tensors(job, rows, kept, context, encoder)
    sha256, size = write_safetensors(Path(folder) / shard_name(job.index), tensors,
                                     _metadata(job, rows, kept, context))
    offsets = tensors["window_offsets"]
    histogram = Counter((offsets[1:] - offsets[:-1]).tolist())
    encoder.seconds["write"] += time.perf_counter() - start
    return {"index": job.index, "file": shard_name(job.index), "row_start": job.start,
            "row_stop": job.stop, "rows": len(kept), "windows": int(offsets[-1]),
            "sha256": sha256, "bytes": size,
            "reused": sum(1 for row in repeats if row not in reasons),
            "windows_histogram": {str(k): histogram[k] for k in sorted(histogram)},
            "rejected": [{"row": r, "id": rows.ids[r], "reason": reasons[r]} for r in sorted(reasons)]}


def run_shards(encoder: CaptionEncoder, rows: CaptionRows, jobs: Sequence[ShardJob], *,
               folder: str, context: ShardContext, batch_size: int,
               on_batch: Callable[[int], None] | None = None) -> Iterator[dict]:
    """Encode and write ``jobs`` in order, yielding each shard's manifest record.

    With ``context.dedup``, a caption repeated within a shard is encoded once and written
    for each of its rows (per shard, so a shard's bytes never depend on others)."""
    out: queue.Queue = queue.Queue(maxsize=_QUEUE_BATCHES)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(encoder, rows, jobs, batch_size, out, stop,
                                                     context.dedup),
                                name="textenc-tokenize", daemon=True)
    producer.start()
    results: dict[int, Any] = {}
    try:
        while True:
            item = out.get()
            if item[0] == "done":
                return
            if item[0] == "error":
                raise item[1]
            if item[0] == "batch":
                results.update(encoder.encode_batch(item[2]))
                if on_batch is not None:
                    on_batch(len(item[2]))
                continue
            job, rejected, repeats = item[1], item[2], item[3]
            record = write_shard(folder, job, rows, results, rejected, context, encoder, repeats)
            if on_batch is not None and repeats:
                on_batch(len(repeats))
            for row in range(job.start, job.stop):
                results.pop(row, None)
            yield record
    finally:
        stop.set()
        producer.join()
