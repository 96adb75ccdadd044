""":func:`encode_dataset`: plan a run, check the output folder, hand the shards to an engine.

Output format: see :mod:`textenc.dataset.format`. Shard ``i`` holds input rows
``[i·N, (i+1)·N)``; a finished shard is never rewritten on a re-run with the
same options (its sha256 is checked against ``manifest.json``), a missing one
is rebuilt byte-identical. Engines: ``local`` (one process, tokenizing in a
background thread) and ``ray`` (:mod:`textenc.dataset.engines.ray`); both write
the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from ..errors import DatasetError
from ..sd import CLIP_TYPES
from ..weighting import WEIGHT_MODES
from .dry_run import dry_run_report
from .encode import OUTPUT_DTYPES, CaptionEncoder, EncodeSettings
from .engines import run_local, run_ray
from .format import FORMAT_VERSION, write_manifest, write_safetensors
from .inputs import read_captions
from .lock import FolderLock
from .manifest import Run, base_manifest, finish_manifest, prepare_folder, shard_totals
from .model import load_model, model_fingerprint, resolve_device
from .pipeline import ShardContext, ShardJob, plan_shards
from .report import DatasetReport

__all__ = ["encode_dataset", "KINDS", "OUTPUTS"]

KINDS = CLIP_TYPES
OUTPUTS = ("cond,pooled", "pooled")


def _check_arguments(*, kind, weight_mode, outputs, dtype, shard_rows, batch_size, engine,
                     workers, clip_skip, limit) -> None:
    checks = [(kind is None or kind in KINDS, f"kind {kind!r} is not one of {KINDS}"),
              (weight_mode is None or weight_mode in WEIGHT_MODES,
               f"weight_mode {weight_mode!r} is not one of {WEIGHT_MODES}"),
              (outputs in OUTPUTS, f"outputs {outputs!r} is not one of {OUTPUTS}"),
              (dtype in OUTPUT_DTYPES, f"dtype {dtype!r} is not one of {tuple(OUTPUT_DTYPES)}"),
              (shard_rows >= 1 and batch_size >= 1 and workers >= 1,
               "shard_rows, batch_size and workers must be at least 1"),
              (engine in ("local", "ray"), f"engine {engine!r} is not 'local' or 'ray'"),
              (clip_skip is None or clip_skip >= 1, f"clip_skip must be >= 1, got {clip_skip}"),
              (limit is None or limit >= 1, f"limit must be >= 1, got {limit}")]
    for ok, message in checks:
        if not ok:
            raise DatasetError(message)


def _write_empty(run: Run, empty) -> None:
    tensors = {"cond": empty[0], "pooled": empty[1]}
    metadata = {"format": FORMAT_VERSION, "model_fingerprint": run.context.fingerprint,
                "options": run.context.options_json}
    sha256, _ = write_safetensors(run.out / "empty.safetensors", tensors, metadata)
    run.manifest["empty"] = {"file": "empty.safetensors", "sha256": sha256}


def encode_dataset(input: str | os.PathLike, *, model: str | os.PathLike, out: str | os.PathLike,
                   column: str = "text", id_column: str | None = None, kind: str | None = None,
                   clip_skip: int | None = None, weight_mode: str | None = None,
                   outputs: str = "cond,pooled", dtype: str = "fp16", shard_rows: int = 10000,
                   batch_size: int = 64, engine: str = "local", workers: int = 1,
                   num_gpus_per_worker: float = 0, ray_address: str | None = None,
                   overwrite: bool = False, limit: int | None = None, dry_run: bool = False,
                   device: str | None = None, max_chars: int = 16384, max_windows: int = 64,
                   per_caption: bool = False, progress: bool | None = None,
                   on_shard_written: Callable[[int], None] | None = None) -> DatasetReport:
    """Encode every caption of ``input`` with the CLIP text encoder(s) of ``model`` into ``out``.

    Args:
        input: parquet file/folder/glob, ``.jsonl``, ``.txt`` or kohya caption folder.
        model: checkpoint file or diffusers model folder.
        out: output folder (created). Options mirror ``textenc encode-dataset``;
            ``clip_skip``/``weight_mode`` None keep the model kind's defaults
            (as ``CLIP.encode_from_tokens`` without options); ``dtype`` is the
            stored dtype; ``max_chars``/``max_windows`` reject over-long captions;
            ``per_caption`` turns off batching (same bytes, slower);
            ``on_shard_written(index)`` is called after each shard is recorded.

    Returns:
        A :class:`DatasetReport`.

    Raises:
        DatasetError: bad input or options, or ``out`` holds another encoding
            (different options, model or input) and ``overwrite`` is False.
    """
    started = time.perf_counter()
    _check_arguments(kind=kind, weight_mode=weight_mode, outputs=outputs, dtype=dtype,
                     shard_rows=shard_rows, batch_size=batch_size, engine=engine,
                     workers=workers, clip_skip=clip_skip, limit=limit)
    rows = read_captions(input, column=column, id_column=id_column, limit=limit)
    clip = load_model(model, kind=kind, device=resolve_device(device))
    settings = EncodeSettings(clip_skip=clip_skip, weight_mode=weight_mode, outputs=outputs,
                              dtype=dtype, max_chars=max_chars, max_windows=max_windows)
    options = {**dataclasses.asdict(settings), "kind": clip.clip_type, "column": column,
               "id_column": id_column, "shard_rows": shard_rows, "limit": limit}
    # The dry run writes nothing, so it skips the sha256 over every weight.
    fingerprint = None if dry_run else model_fingerprint(clip)
    jobs = plan_shards(len(rows), shard_rows)
    empty = CaptionEncoder(clip, settings).encode_empty()
    manifest = base_manifest(rows, clip, fingerprint, options, jobs, empty)
    context = ShardContext(fingerprint, json.dumps(options, sort_keys=True), manifest["cond_width"],
                           manifest["pooled_width"], all(isinstance(i, int) for i in rows.ids),
                           manifest["window_length"])
    run = Run(rows, clip, settings, manifest, jobs, context, Path(out))
    if dry_run:
        return dry_run_report(run, started=started)
    run.out.mkdir(parents=True, exist_ok=True)
    with FolderLock(run.out):  # one run per folder; see textenc.dataset.lock
        records = prepare_folder(run.out, manifest, overwrite=overwrite)
        _write_empty(run, empty)
        finish_manifest(manifest, records)
        write_manifest(run.out, manifest)
        todo = [job for job in jobs if job.index not in records]
        skipped = len(jobs) - len(todo)
        if engine == "local":
            timings = run_local(run, todo, records, batch_size=batch_size, per_caption=per_caption,
                                progress=progress, on_shard_written=on_shard_written)
        else:
            timings = run_ray(run, todo, records, batch_size=batch_size, workers=workers,
                              num_gpus_per_worker=num_gpus_per_worker, ray_address=ray_address,
                              model=os.fspath(model), device=device, per_caption=per_caption,
                              on_shard_written=on_shard_written)
    return _report(run, records, todo=todo, skipped=skipped, timings=timings, started=started)


def _report(run: Run, records: dict, *, todo: Sequence[ShardJob], skipped: int, timings: dict,
            started: float) -> DatasetReport:
    seconds = time.perf_counter() - started
    totals = shard_totals([records[i] for i in sorted(records)])
    encoded_now = sum(records[job.index]["rows"] for job in todo)
    rejected = run.manifest.get("rejected", [])
    return DatasetReport(out=str(run.out), rows=len(run.rows), encoded=totals["encoded"],
                         shards=len(run.jobs), shards_written=len(todo), shards_skipped=skipped,
                         seconds=seconds, captions_per_s=encoded_now / seconds if seconds else 0.0,
                         bytes=totals["bytes"], windows_histogram=totals["windows_histogram"],
                         rejected=rejected, timings=timings)
