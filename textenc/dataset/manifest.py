"""The manifest of a run: building it, checking an existing output folder, recording shards.

:class:`Run` is the state one :func:`textenc.dataset.encode_dataset` call hands
to its engine; an engine calls :func:`record_shard` for every shard it wrote.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import DatasetError
from .encode import EncodeSettings
from .format import FORMAT_VERSION, clean_temp_files, file_sha256, read_manifest, shard_name, write_manifest
from .inputs import CaptionRows
from .layout import Layout
from .pipeline import ShardContext, ShardJob, shard_record_histogram

__all__ = ["Run", "base_manifest", "prepare_folder", "shard_totals", "finish_manifest",
           "record_shard", "describe_changes", "IDENTITY_KEYS"]

IDENTITY_KEYS = ("format", "model_fingerprint", "options", "compute", "input")


@dataclasses.dataclass
class Run:
    """State shared by the steps of one :func:`encode_dataset` call."""

    rows: CaptionRows
    clip: Any
    settings: EncodeSettings
    manifest: dict
    jobs: list[ShardJob]
    context: ShardContext
    out: Path


def _widths(clip) -> dict[str, int]:
    """Each text encoder's width, by role (CLIP's ``hidden_size``, T5's ``d_model``)."""
    return {role: getattr(encoder.config, "hidden_size", None) or encoder.config.d_model
            for role, encoder in clip.cond_stage_model.encoders.items()}


def base_manifest(rows: CaptionRows, clip, fingerprint: str | None, options: dict, jobs, layout: Layout) -> dict:
    """The manifest of a run before any shard is written."""
    manifest = {"format": FORMAT_VERSION, "model_fingerprint": fingerprint, "options": options,
                "input": {"rows": len(rows), "sha256": rows.digest()}, "kind": clip.clip_type,
                "widths": _widths(clip), "cond_width": layout.cond_width,
                "pooled_width": layout.pooled_width, "window_length": layout.window_length,
                "num_shards": len(jobs), "shards": [], "complete": False,
                "skipped_inputs": list(rows.skipped)}
    if layout.sequence:
        manifest["layout"] = layout.manifest()
    return manifest


def _our_files(out: Path) -> list[Path]:
    return sorted(out.glob("shard-[0-9][0-9][0-9][0-9][0-9].safetensors")) + sorted(out.glob("empty.safetensors"))


def _kept_records(out: Path, old: dict, manifest: dict) -> dict[int, dict]:
    """Refuse a folder holding another encoding → the old shard records that still hold."""
    changes = describe_changes(old, manifest)
    if changes:
        raise DatasetError(f"{out} was encoded differently: {'; '.join(changes)}. "
                           "Pass --overwrite to replace it or choose another --out")
    kept = {}
    for record in old.get("shards", []):
        path = out / record["file"]
        if record["index"] < manifest["num_shards"] and path.exists() \
                and file_sha256(path) == record["sha256"]:
            kept[record["index"]] = record
    return kept


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _option_changes(old: Any, new: Any, *, prefix: str = "") -> list[str]:
    old, new = old if isinstance(old, dict) else {}, new if isinstance(new, dict) else {}
    return [f"{prefix}{key} {_short(old.get(key))} -> {_short(new.get(key))}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def describe_changes(old: dict, new: dict) -> list[str]:
    """What differs between an output folder's manifest and this run, one phrase each:
    every changed option and compute setting (old -> new), the model, the input."""
    changes = []
    if old.get("format") != new.get("format"):
        changes.append(f"format {_short(old.get('format'))} -> {_short(new.get('format'))}")
    options = _option_changes(old.get("options"), new.get("options"))
    if options:
        changes.append("different options: " + ", ".join(options))
    compute = _option_changes(old.get("compute"), new.get("compute"))
    if compute:
        changes.append("different compute settings: " + ", ".join(compute))
    if old.get("model_fingerprint") != new.get("model_fingerprint"):
        changes.append("a different model (model_fingerprint "
                       f"{_short(old.get('model_fingerprint'))} -> {_short(new.get('model_fingerprint'))})")
    if old.get("input") != new.get("input"):
        before, after = old.get("input") or {}, new.get("input") or {}
        changes.append(f"a different input ({before.get('rows')} rows, {_short(before.get('sha256'))} -> "
                       f"{after.get('rows')} rows, {_short(after.get('sha256'))})")
    return changes


def prepare_folder(out: Path, manifest: dict, *, overwrite: bool) -> dict[int, dict]:
    """Check an existing output folder and write this run's manifest → the shard records kept.

    Call it holding the folder's :class:`~textenc.dataset.lock.FolderLock`. The
    manifest is written before any other file of the run, so whatever a kill
    leaves behind, the folder has a manifest naming this encoding and a re-run
    resumes it. Shard files the manifest does not list are rewritten by the
    run, or removed here when the run has no such shard.
    """
    out.mkdir(parents=True, exist_ok=True)
    clean_temp_files(out)
    old = None if overwrite else read_manifest(out)
    if old is None and not overwrite and _our_files(out):
        raise DatasetError(f"{out} holds shard files but no manifest.json; "
                           "pass --overwrite to replace them")
    kept = {} if old is None else _kept_records(out, old, manifest)
    finish_manifest(manifest, kept)
    write_manifest(out, manifest)  # replaces the old one atomically: this folder is now ours
    wanted = {shard_name(index) for index in kept}
    for path in _our_files(out):
        if path.name == "empty.safetensors":
            stale = overwrite
        else:
            stale = path.name not in wanted and (overwrite or int(path.name[6:11]) >= manifest["num_shards"])
        if stale:
            path.unlink(missing_ok=True)
    return kept


def shard_totals(shards: Sequence[dict]) -> dict:
    """Rows encoded, windows, bytes and the windows histogram over shard records."""
    return {"encoded": sum(r["rows"] for r in shards),
            "windows": sum(r["windows"] for r in shards),
            "bytes": sum(r["bytes"] for r in shards),
            "reused": sum(r.get("reused", 0) for r in shards),
            "windows_histogram": shard_record_histogram(shards)}


def finish_manifest(manifest: dict, records: dict[int, dict]) -> None:
    """List ``records`` in ``manifest``; when every shard is there, add the totals."""
    shards = [records[i] for i in sorted(records)]
    manifest["shards"] = shards
    manifest["complete"] = len(shards) == manifest["num_shards"]
    if manifest["complete"]:
        rejected = [entry for record in shards for entry in record["rejected"]]
        manifest["totals"] = {"rows": manifest["input"]["rows"], "rejected": len(rejected),
                              **shard_totals(shards)}
        manifest["rejected"] = rejected


def record_shard(run: Run, records: dict[int, dict], record: dict,
                 on_shard_written: Callable[[int], None] | None) -> None:
    """A shard is on disk: list it in the manifest (rewritten atomically), then tell the caller."""
    records[record["index"]] = record
    finish_manifest(run.manifest, records)
    write_manifest(run.out, run.manifest)
    if on_shard_written is not None:
        on_shard_written(record["index"])
