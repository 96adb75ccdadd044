"""``encode-dataset --dry-run``: the shard plan, windows histogram, rejected rows and
estimated output size, from tokenizing every caption (nothing is encoded)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ..text_encoders.sequences import sequence_length
from .encode import OUTPUT_DTYPES, CaptionEncoder
from .format import shard_name
from .pipeline import shard_record_histogram
from .report import DatasetReport

__all__ = ["dry_run_report", "format_plan"]

_HEADER_BYTES = 1024  # safetensors header and metadata, per shard (an estimate)


def _shard_plan(encoder: CaptionEncoder, run: Any, job) -> dict:
    histogram: Counter = Counter()
    rejected, t5_rows = [], 0
    layout = encoder.layout
    for row in range(job.start, job.stop):
        item = encoder.tokenize(row, run.rows.texts[row], run.rows.rejected.get(row))
        if item.reason is not None:
            rejected.append({"row": row, "id": run.rows.ids[row], "reason": item.reason})
        else:
            histogram[item.windows] += 1
            t5_rows += sequence_length(item.tokens[layout.t5_role]) if layout.t5_width else 0
    captions = sum(histogram.values())
    windows = sum(k * v for k, v in histogram.items())
    item_bytes = OUTPUT_DTYPES[run.settings.dtype].itemsize
    cond = (windows * run.context.window_length * run.context.cond_width + t5_rows * layout.t5_width) * item_bytes
    size = (_HEADER_BYTES + captions * (16 + run.context.pooled_width * item_bytes)
            + 8 * (captions + 1) + (cond if run.settings.want_cond else 0))
    return {"index": job.index, "file": shard_name(job.index),
            "row_start": job.start, "row_stop": job.stop, "rows": captions, "windows": windows,
            "estimated_bytes": size, "windows_histogram": {str(k): histogram[k] for k in sorted(histogram)},
            "rejected": rejected}


def dry_run_report(run: Any, *, started: float) -> DatasetReport:
    """Tokenize every row of ``run`` and describe the shards that would be written."""
    encoder = CaptionEncoder(run.clip, run.settings)
    plan = [_shard_plan(encoder, run, job) for job in run.jobs]
    seconds = time.perf_counter() - started
    return DatasetReport(out=str(run.out), rows=len(run.rows), encoded=sum(s["rows"] for s in plan),
                        shards=len(plan), shards_written=len(plan), shards_skipped=0,
                        seconds=seconds, captions_per_s=0.0,
                        bytes=sum(s["estimated_bytes"] for s in plan),
                        windows_histogram=shard_record_histogram(plan),
                        rejected=[r for s in plan for r in s["rejected"]],
                        timings=dict(encoder.seconds), dry_run=True, plan=plan)


def format_plan(report: Any, *, max_rejected: int = 20) -> str:
    """The dry-run report as text for the terminal."""
    lines = [f"{report.rows} rows -> {report.shards} shard(s) in {report.out}"]
    for shard in report.plan:
        lines.append(f"  {shard['file']}  rows [{shard['row_start']}, {shard['row_stop']})  "
                     f"{shard['rows']} captions, {shard['windows']} windows, "
                     f"~{shard['estimated_bytes'] / 1e6:.2f} MB, {len(shard['rejected'])} rejected")
    lines.append("windows per caption: " + ", ".join(f"{k}: {v}" for k, v in report.windows_histogram.items()))
    lines.append(f"rejected rows: {len(report.rejected)}")
    for entry in report.rejected[:max_rejected]:
        lines.append(f"  row {entry['row']} (id {entry['id']!r}): {entry['reason']}")
    if len(report.rejected) > max_rejected:
        lines.append(f"  ... and {len(report.rejected) - max_rejected} more")
    lines.append(f"estimated output size: {report.bytes / 1e6:.2f} MB")
    return "\n".join(lines)
