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

from .encode import OUTPUT_DTYPES, CaptionEncoder, Tokenized
from .layout import Row
from .format import FORMAT_VERSION, shard_name, write_safetensors
from .inputs import CaptionRows

__all__ = ["ShardJob", "ShardContext", "ReusePlan", "plan_shards", "plan_reuse", "reuse_plan",
           "reused_across_shards", "run_shards", "shard_record_histogram", "REUSE_BYTES"]

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
    dedup: bool = True  # encode a caption repeated in the run once (see plan_reuse)
    t5_width: int = 0  # T5 families: the width and minimum rows of a caption's T5 part
    t5_rows: int = 0


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


#: About how many bytes of encodings a run keeps for captions that repeat in a later shard
#: (counted as one window each); past it, a caption first seen in an earlier shard is encoded again.
REUSE_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class ReusePlan:
    """Which rows reuse an earlier row's encoding, over every shard of one :func:`run_shards` call."""

    repeats: dict[int, int]  # row -> the earlier row with the same caption
    last_use: dict[int, int]  # a row read by a later shard -> the last shard index that reads it
    expires: dict[int, list[int]]  # shard index -> the rows of last_use it is the last to read

    def for_shard(self, job: ShardJob) -> "ReusePlan":
        """The part of the plan one shard's own :func:`run_shards` call needs (a Ray actor's):
        its rows' repeats (their sources may lie in earlier shards, whose encodings the caller
        puts in ``results``) and its rows that later shards read (kept in ``results``)."""
        rows = range(job.start, job.stop)
        return ReusePlan({row: self.repeats[row] for row in rows if row in self.repeats},
                         {row: self.last_use[row] for row in rows if row in self.last_use}, {})


def plan_reuse(rows: CaptionRows, jobs: Sequence[ShardJob], *, dedup: bool, keep_rows: int) -> ReusePlan:
    """Every row whose caption an earlier row of ``jobs`` has (in order, across shards), and how
    long each earlier row's encoding is kept. Options are the run's and a caption encodes to the
    same bits in any batch, so reuse never changes a shard's bytes. At most ``keep_rows`` rows
    are kept past their own shard; a repeat beyond that is encoded again in its shard."""
    if not dedup:
        return ReusePlan({}, {}, {})
    first_of: dict[str, tuple[int, int]] = {}  # caption -> (row, shard index)
    repeats: dict[int, int] = {}
    last_use: dict[int, int] = {}
    for job in jobs:
        for row in range(job.start, job.stop):
            text = rows.texts[row]
            if text is None or row in rows.rejected:
                continue
            first, shard = first_of.setdefault(text, (row, job.index))
            if first == row:
                continue
            if shard == job.index or first in last_use or len(last_use) < keep_rows:
                repeats[row] = first
                if shard != job.index:
                    last_use[first] = job.index
            else:
                first_of[text] = (row, job.index)  # kept rows are used up: this shard encodes it again
    expires: dict[int, list[int]] = {}
    for row, index in last_use.items():
        expires.setdefault(index, []).append(row)
    return ReusePlan(repeats, last_use, expires)


def _tokenize_job(encoder: CaptionEncoder, rows: CaptionRows, job: ShardJob, batch_size: int,
                  out: queue.Queue, stop: threading.Event, plan: ReusePlan) -> bool:
    groups: dict[tuple, list[Tokenized]] = {}
    rejected: dict[int, str] = {}
    repeats: dict[int, int] = {}
    for row in range(job.start, job.stop):
        first = plan.repeats.get(row)
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
             out: queue.Queue, stop: threading.Event, plan: ReusePlan) -> None:
    try:
        for job in jobs:
            if not _tokenize_job(encoder, rows, job, batch_size, out, stop, plan):
                return
        _put(out, ("done",), stop)
    except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread, re-raised there
        _put(out, ("error", exc), stop)


def _offsets(counts: Sequence[int]) -> torch.Tensor:
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    if counts:
        offsets[1:] = torch.tensor(list(counts), dtype=torch.int64).cumsum(0)
    return offsets


def _stacked(parts: list, width: int, dtype: torch.dtype, *, cat: bool) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, width, dtype=dtype)
    return torch.cat(parts) if cat else torch.stack(parts)


def _shard_tensors(job: ShardJob, rows: CaptionRows, kept: list[tuple[int, Row]],
                   context: ShardContext, encoder: CaptionEncoder) -> dict[str, torch.Tensor]:
    """The shard's tensors, in the order they are written (see :mod:`textenc.dataset.format`)."""
    layout, dtype = encoder.layout, encoder.out_dtype
    tensors = {"ids": torch.tensor([rows.ids[r] if context.int_ids else r for r, _ in kept],
                                   dtype=torch.int64),
               "rows": torch.tensor([r for r, _ in kept], dtype=torch.int64),
               "window_offsets": _offsets([result.windows for _, result in kept])}
    want_cond = encoder.settings.want_cond
    if want_cond and layout.cond_width:
        tensors["cond"] = _stacked([result.cond for _, result in kept], layout.cond_width, dtype, cat=True)
    if layout.pooled_width:
        tensors["pooled"] = _stacked([result.pooled for _, result in kept], layout.pooled_width, dtype, cat=False)
    if layout.sequence and layout.t5_width:
        tensors["t5_tokens"] = torch.tensor([result.t5_tokens for _, result in kept], dtype=torch.int64)
        if want_cond:
            tensors["t5_offsets"] = _offsets([result.t5.shape[0] for _, result in kept])
            tensors["t5"] = _stacked([result.t5 for _, result in kept], layout.t5_width, dtype, cat=True)
    if layout.sequence and layout.clip_role:
        tensors["clip_tokens"] = torch.tensor([result.clip_tokens for _, result in kept], dtype=torch.int64)
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
    earlier row (of this shard or, kept in ``results``, an earlier one) with the same caption,
    whose encoding (or reason for rejection) it reuses."""
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
            "reused": _repeats_within(job, rows, repeats, reasons),
            "windows_histogram": {str(k): histogram[k] for k in sorted(histogram)},
            "rejected": [{"row": r, "id": rows.ids[r], "reason": reasons[r]} for r in sorted(reasons)]}


def run_shards(encoder: CaptionEncoder, rows: CaptionRows, jobs: Sequence[ShardJob], *,
               folder: str, context: ShardContext, batch_size: int,
               on_batch: Callable[[int], None] | None = None, plan: ReusePlan | None = None,
               results: dict[int, Any] | None = None) -> Iterator[dict]:
    """Encode and write ``jobs`` in order, yielding each shard's manifest record.

    With ``context.dedup``, a caption repeated anywhere in ``jobs`` is encoded once and written
    for each of its rows (``plan``, by default :func:`reuse_plan` of ``jobs``; the bytes are those
    of encoding every row). A record's ``reused`` counts the repeats within its shard only, so the
    manifest is the same whichever shards one run (or engine) encoded together.

    ``results`` (row -> encoding, or the reason it was rejected) is the caller's, to run one
    shard of a longer plan (:meth:`ReusePlan.for_shard`): it holds the earlier shards' encodings
    the plan's repeats read, and afterwards the rows that the plan says later shards read."""
    out: queue.Queue = queue.Queue(maxsize=_QUEUE_BATCHES)
    stop = threading.Event()
    plan = reuse_plan(rows, jobs, context, encoder.settings.dtype) if plan is None else plan
    producer = threading.Thread(target=_produce, args=(encoder, rows, jobs, batch_size, out, stop, plan),
                                name="textenc-tokenize", daemon=True)
    producer.start()
    results = {} if results is None else results
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
            _forget(results, job, rejected, plan)
            yield record
    finally:
        stop.set()
        producer.join()


def reuse_plan(rows: CaptionRows, jobs: Sequence[ShardJob], context: ShardContext, dtype: str) -> ReusePlan:
    """:func:`plan_reuse` for a run's ``context`` and stored ``dtype``, keeping about
    :data:`REUSE_BYTES` (one window per caption) past their shards."""
    # one window, or the T5 minimum, per caption
    width = context.window_length * context.cond_width + context.pooled_width + context.t5_rows * context.t5_width
    itemsize = torch.empty(0, dtype=OUTPUT_DTYPES[dtype]).element_size()
    return plan_reuse(rows, jobs, dedup=context.dedup, keep_rows=max(1, REUSE_BYTES // (width * itemsize)))


def _repeats_within(job: ShardJob, rows: CaptionRows, repeats: dict[int, int], reasons: dict[int, str]) -> int:
    """Reused rows whose caption an earlier row of the same shard has: a shard record's count,
    the same whichever shards one run (or engine) encoded together."""
    seen, count = set(), 0
    for row in range(job.start, job.stop):
        text = rows.texts[row]
        count += row in repeats and row not in reasons and text in seen
        seen.add(text)
    return count


def reused_across_shards(plan: ReusePlan, jobs: Sequence[ShardJob], records: dict[int, dict]) -> int:
    """Rows of ``jobs`` written from an earlier shard's encoding, beyond the records' own
    counts of repeats within a shard (rejected rows not counted)."""
    count = 0
    for job in jobs:
        record = records[job.index]
        rejected = {entry["row"] for entry in record["rejected"]}
        reused = sum(1 for row in range(job.start, job.stop) if row in plan.repeats and row not in rejected)
        count += reused - record["reused"]
    return count


def _forget(results: dict[int, Any], job: ShardJob, rejected: dict[int, str], plan: ReusePlan) -> None:
    """Drop the encodings no later shard reads; keep a later-read row's rejection as its result."""
    for row in range(job.start, job.stop):
        if plan.last_use.get(row, -1) > job.index:
            if row in rejected:
                results[row] = rejected[row]
        else:
            results.pop(row, None)
    for row in plan.expires.get(job.index, ()):
        results.pop(row, None)
