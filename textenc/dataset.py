"""Encode a caption dataset into sharded safetensors files (``textenc encode-dataset``).

>>> # report = encode_dataset("captions.txt", model="sd15.safetensors", out="te_cache")
>>> # for caption_id, cond, pooled in open_shards("te_cache"): ...

Output format: see :mod:`textenc.dataset_format`. Shard ``i`` holds input rows
``[i·N, (i+1)·N)``; a finished shard is never rewritten on a re-run with the
same options (its sha256 is checked against ``manifest.json``), a missing one
is rebuilt byte-identical. Engines: ``local`` (one process, tokenizing in a
background thread) and ``ray`` (:mod:`textenc.dataset_ray`); both write the
same bytes. Run standalone as ``python -m textenc.dataset INPUT --model M --out DIR``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .dataset_cli import add_encode_dataset_arguments, main, run_encode_dataset
from .dataset_encode import OUTPUT_DTYPES, CaptionEncoder, EncodeSettings
from .dataset_format import (FORMAT_VERSION, _tensor_bytes, clean_temp_files, export_diffusers, export_kohya,
                             file_sha256, open_shards, read_manifest, write_manifest,
                             write_safetensors)
from .dataset_io import CaptionRows, read_captions
from .dataset_pipeline import ShardContext, ShardJob, plan_shards, run_shards, shard_record_histogram
from .errors import DatasetError
from .sd import CLIP_TYPES, load_clip
from .weighting import WEIGHT_MODES

__all__ = ["DatasetReport", "encode_dataset", "open_shards", "export_diffusers", "export_kohya",
           "add_encode_dataset_arguments", "run_encode_dataset", "model_fingerprint", "main"]

KINDS = CLIP_TYPES
OUTPUTS = ("cond,pooled", "pooled")
_IDENTITY_KEYS = ("format", "model_fingerprint", "options", "input")


@dataclasses.dataclass
class DatasetReport:
    """What :func:`encode_dataset` did (or, with ``dry_run``, would do)."""

    out: str
    rows: int
    encoded: int
    shards: int
    shards_written: int
    shards_skipped: int
    seconds: float
    captions_per_s: float
    bytes: int
    windows_histogram: dict[str, int]
    rejected: list[dict]
    timings: dict[str, float]
    dry_run: bool = False
    plan: list[dict] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        return (f"{self.rows} rows, {self.encoded} encoded, {len(self.rejected)} rejected; "
                f"{verb} {self.shards_written} of {self.shards} shards "
                f"({self.shards_skipped} skipped), {self.bytes / 1e6:.1f} MB; "
                f"{self.captions_per_s:.0f} captions/s")


@dataclasses.dataclass
class _Run:
    """State shared by the steps of one :func:`encode_dataset` call."""

    rows: CaptionRows
    clip: Any
    settings: EncodeSettings
    manifest: dict
    jobs: list[ShardJob]
    context: ShardContext
    out: Path


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(model: str | os.PathLike, *, kind: str | None, device: str):
    """A :class:`textenc.sd.CLIP` from a checkpoint file or a diffusers model folder."""
    path = os.fspath(model)
    if not os.path.exists(path):
        raise DatasetError(f"--model {path}: no such file or folder")
    if os.path.isdir(path):
        from .diffusers_load import load_from_diffusers

        clip = load_from_diffusers(path, device=device)
        if kind is not None and clip.clip_type != kind:
            raise DatasetError(f"--kind {kind} was asked for, but {path} is a {clip.clip_type} model")
        return clip
    return load_clip(path, clip_type=kind, device=device)


def model_fingerprint(clip) -> str:
    """sha256 over the text encoders' weights (names, dtypes, shapes, bytes)."""
    hasher = hashlib.sha256()
    state = clip.cond_stage_model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        hasher.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        hasher.update(_tensor_bytes(tensor))
    return "sha256:" + hasher.hexdigest()


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


def _widths(clip, empty_cond: torch.Tensor) -> dict[str, int]:
    model = clip.cond_stage_model
    if clip.clip_type == "sdxl":
        return {"l": model.clip_l.config.hidden_size, "g": model.clip_g.config.hidden_size}
    return {model.clip_name: empty_cond.shape[-1]}


def _base_manifest(rows: CaptionRows, clip, fingerprint: str, options: dict, jobs, empty) -> dict:
    return {"format": FORMAT_VERSION, "model_fingerprint": fingerprint, "options": options,
            "input": {"rows": len(rows), "sha256": rows.digest()}, "kind": clip.clip_type,
            "widths": _widths(clip, empty[0]), "cond_width": int(empty[0].shape[-1]),
            "pooled_width": int(empty[1].shape[-1]), "window_length": int(empty[0].shape[0]),
            "num_shards": len(jobs), "shards": [], "complete": False}


def _prepare_folder(out: Path, manifest: dict, *, overwrite: bool) -> dict[int, dict]:
    """Check an existing output folder → the records of shards that can be kept."""
    out.mkdir(parents=True, exist_ok=True)
    clean_temp_files(out)
    old = None if overwrite else read_manifest(out)
    ours = sorted(out.glob("shard-*.safetensors")) + sorted(out.glob("empty.safetensors"))
    if overwrite:
        for path in ours + [out / "manifest.json"]:
            path.unlink(missing_ok=True)
        return {}
    if old is None:
        if ours:
            raise DatasetError(f"{out} holds shard files but no manifest.json; "
                               "pass --overwrite to replace them")
        return {}
    changed = [key for key in _IDENTITY_KEYS if old.get(key) != manifest.get(key)]
    if changed:
        raise DatasetError(f"{out} was encoded with a different {' and '.join(changed)}; "
                           "pass --overwrite to replace it or choose another --out")
    kept = {}
    for record in old.get("shards", []):
        path = out / record["file"]
        if path.exists() and file_sha256(path) == record["sha256"]:
            kept[record["index"]] = record
    return kept


def _shard_totals(shards: Sequence[dict]) -> dict:
    """Rows encoded, windows, bytes and the windows histogram over shard records."""
    return {"encoded": sum(r["rows"] for r in shards),
            "windows": sum(r["windows"] for r in shards),
            "bytes": sum(r["bytes"] for r in shards),
            "windows_histogram": shard_record_histogram(shards)}


def _finish_manifest(manifest: dict, records: dict[int, dict]) -> None:
    shards = [records[i] for i in sorted(records)]
    manifest["shards"] = shards
    manifest["complete"] = len(shards) == manifest["num_shards"]
    if manifest["complete"]:
        rejected = [entry for record in shards for entry in record["rejected"]]
        manifest["totals"] = {"rows": manifest["input"]["rows"], "rejected": len(rejected),
                              **_shard_totals(shards)}
        manifest["rejected"] = rejected


def _record_shard(run: _Run, records: dict[int, dict], record: dict,
                  on_shard_written: Callable[[int], None] | None) -> None:
    """A shard is on disk: list it in the manifest (rewritten atomically), then tell the caller."""
    records[record["index"]] = record
    _finish_manifest(run.manifest, records)
    write_manifest(run.out, run.manifest)
    if on_shard_written is not None:
        on_shard_written(record["index"])


def _progress(total: int, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty() and "PYTEST_CURRENT_TEST" not in os.environ
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None  # the bar is a convenience; without tqdm the run is the same
    return tqdm(total=total, unit="caption", file=sys.stderr, smoothing=0.1)


def _run_local(run: _Run, todo: list[ShardJob], records: dict, *, batch_size: int,
               per_caption: bool, progress: bool | None,
               on_shard_written: Callable[[int], None] | None) -> dict[str, float]:
    encoder = CaptionEncoder(run.clip, run.settings, per_caption=per_caption)
    bar = _progress(sum(j.stop - j.start for j in todo), progress)
    try:
        for record in run_shards(encoder, run.rows, todo, folder=str(run.out), context=run.context,
                                 batch_size=batch_size, on_batch=bar.update if bar else None):
            _record_shard(run, records, record, on_shard_written)
    finally:
        if bar is not None:
            bar.close()
    return dict(encoder.seconds)


def _write_empty(run: _Run, empty) -> None:
    tensors = {"cond": empty[0], "pooled": empty[1]}
    metadata = {"format": FORMAT_VERSION, "model_fingerprint": run.context.fingerprint,
                "options": run.context.options_json}
    sha256, _ = write_safetensors(run.out / "empty.safetensors", tensors, metadata)
    run.manifest["empty"] = {"file": "empty.safetensors", "sha256": sha256}


def _dry_run_report(run: _Run, *, started: float) -> DatasetReport:
    from .dataset_dry_run import dry_run_report
    return dry_run_report(run, DatasetReport, started=started)


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
    manifest = _base_manifest(rows, clip, fingerprint, options, jobs, empty)
    context = ShardContext(fingerprint, json.dumps(options, sort_keys=True), manifest["cond_width"],
                           manifest["pooled_width"], all(isinstance(i, int) for i in rows.ids),
                           manifest["window_length"])
    run = _Run(rows, clip, settings, manifest, jobs, context, Path(out))
    if dry_run:
        return _dry_run_report(run, started=started)
    records = _prepare_folder(run.out, manifest, overwrite=overwrite)
    _write_empty(run, empty)
    _finish_manifest(manifest, records)
    write_manifest(run.out, manifest)
    todo = [job for job in jobs if job.index not in records]
    skipped = len(jobs) - len(todo)
    if engine == "local":
        timings = _run_local(run, todo, records, batch_size=batch_size, per_caption=per_caption,
                             progress=progress, on_shard_written=on_shard_written)
    else:
        from .dataset_ray import run_ray
        timings = run_ray(run, todo, records, batch_size=batch_size, workers=workers,
                          num_gpus_per_worker=num_gpus_per_worker, ray_address=ray_address,
                          model=os.fspath(model), device=device, per_caption=per_caption,
                          on_shard_written=on_shard_written)
    return _report(run, records, todo=todo, skipped=skipped, timings=timings, started=started)


def _report(run: _Run, records: dict, *, todo: Sequence[ShardJob], skipped: int, timings: dict,
            started: float) -> DatasetReport:
    seconds = time.perf_counter() - started
    totals = _shard_totals([records[i] for i in sorted(records)])
    encoded_now = sum(records[job.index]["rows"] for job in todo)
    rejected = run.manifest.get("rejected", [])
    return DatasetReport(out=str(run.out), rows=len(run.rows), encoded=totals["encoded"],
                         shards=len(run.jobs), shards_written=len(todo), shards_skipped=skipped,
                         seconds=seconds, captions_per_s=encoded_now / seconds if seconds else 0.0,
                         bytes=totals["bytes"], windows_histogram=totals["windows_histogram"],
                         rejected=rejected, timings=timings)


if __name__ == "__main__":  # pragma: no cover - exercised through the CLI tests
    sys.exit(main())
