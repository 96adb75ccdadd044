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

from ..commands.common import check_folder, check_out_folder
from ..commands.early_checks import check_clip_skip_depth
from ..prompts.dialects import check_syntax, default_weight_mode, dialect_options
from ..prompts.dialects.compel.tokens import TRUNCATION_WARNING
from ..errors import DatasetError, PromptWarning
from ..sd import CLIP_TYPES
from ..text_encoders.a1111_families import is_sd3_a1111
from ..text_encoders.clip_skip import check_clip_skip
from ..text_encoders.sequences import sequence_length, with_min_length
from ..text_encoders.weighting import NORMALIZATIONS, WEIGHT_MODES
from ..warn import ON_MISSING_EMBEDDING, Tally, first_of_kind, missing_embedding_policy
from .compute import DEFAULT_THREADS, resolve_compute_dtype, torch_threads
from .dry_run import dry_run_report
from .encode import OUTPUT_DTYPES, CaptionEncoder, EncodeSettings, layer_for_clip_skip, resolved_layers
from .engines import ENGINES, run_local, run_ray
from .format import FORMAT_VERSION, write_manifest, write_safetensors
from .inputs import read_captions
from .lock import FolderLock
from .manifest import Run, base_manifest, finish_manifest, prepare_folder, shard_totals
from .model import cast_for_compute, embeddings_fingerprint, load_model, model_fingerprint, resolve_device
from .pipeline import ShardContext, ShardJob, plan_shards, reuse_plan, reused_across_shards
from .report import DatasetReport

__all__ = ["encode_dataset", "KINDS", "OUTPUTS"]

KINDS = CLIP_TYPES
OUTPUTS = ("cond,pooled", "pooled")


@dataclasses.dataclass(frozen=True)
class Request:
    """The arguments of one :func:`encode_dataset` call."""

    input: str | os.PathLike
    model: str | os.PathLike | Sequence[str | os.PathLike]
    out: str | os.PathLike
    column: str
    id_column: str | None
    clip_type: str | None
    kind: str | None
    clip_skip: int | None
    syntax: str
    truncate_long_prompts: bool
    weight_mode: str | None
    normalization: str
    embeddings: str | os.PathLike | None
    on_missing_embedding: str
    outputs: str
    dtype: str
    shard_rows: int
    batch_size: int
    engine: str
    workers: int
    num_gpus_per_worker: float
    ray_address: str | None
    overwrite: bool
    limit: int | None
    dry_run: bool
    device: str | None
    max_chars: int
    max_windows: int
    t5_min_length: int | None
    threads: int
    compute_dtype: str
    dedup: bool
    fast_pooled: bool
    progress: bool | None
    on_shard_written: Callable[[int], None] | None


def _check_request(request: Request) -> None:
    r = request
    checks = [(r.clip_type in (None, "auto", *KINDS), f"clip_type {r.clip_type!r} is not one of {KINDS}"),
              (r.kind in (None, "auto", *KINDS), f"kind {r.kind!r} is not one of {KINDS}"),
              (r.weight_mode is None or r.weight_mode in WEIGHT_MODES,
               f"weight_mode {r.weight_mode!r} is not one of {WEIGHT_MODES}"),
              (r.normalization in NORMALIZATIONS,
               f"normalization {r.normalization!r} is not one of {NORMALIZATIONS}"),
              (r.on_missing_embedding in ON_MISSING_EMBEDDING,
               f"on_missing_embedding {r.on_missing_embedding!r} is not one of {ON_MISSING_EMBEDDING}"),
              (r.outputs in OUTPUTS, f"outputs {r.outputs!r} is not one of {OUTPUTS}"),
              (r.dtype in OUTPUT_DTYPES, f"dtype {r.dtype!r} is not one of {tuple(OUTPUT_DTYPES)}"),
              (min(r.shard_rows, r.batch_size, r.workers, r.threads) >= 1,
               "shard_rows, batch_size, workers and threads must be at least 1"),
              (r.engine in ENGINES, f"engine {r.engine!r} is not one of {ENGINES}"),
              (isinstance(r.fast_pooled, bool), f"fast_pooled must be True or False, got {r.fast_pooled!r}"),
              (isinstance(r.truncate_long_prompts, bool),
               f"truncate_long_prompts must be True or False, got {r.truncate_long_prompts!r}"),
              (r.limit is None or r.limit >= 1, f"limit must be >= 1, got {r.limit}"),
              (r.t5_min_length is None or (isinstance(r.t5_min_length, int) and r.t5_min_length >= 1),
               f"t5_min_length must be None or at least 1, got {r.t5_min_length!r}")]
    for ok, message in checks:
        if not ok:
            raise DatasetError(message)
    check_syntax(r.syntax)
    # what needs no weights is checked before they load (issue 28), the clip skip against the
    # depth in the model's headers too; the model path is checked by load_model before it
    # reads anything, after the input file
    if r.clip_skip is not None:
        check_clip_skip(r.clip_skip)
        check_clip_skip_depth(r.clip_skip, [r.model] if isinstance(r.model, (str, os.PathLike)) else r.model)
    if not r.dry_run:
        check_out_folder(r.out)
    dialect_options(r.syntax, {"truncate_long_prompts": r.truncate_long_prompts})


def _resolve_request(request: Request) -> Request:
    """``clip_type`` from ``clip_type`` or its old name ``kind`` ("auto" is None), and the
    embedding folder checked and made absolute.

    Raises:
        DatasetError: ``clip_type`` and ``kind`` that disagree; a missing embedding folder.
    """
    clip_type = None if request.clip_type == "auto" else request.clip_type
    kind = None if request.kind == "auto" else request.kind
    if clip_type is not None and kind is not None and clip_type != kind:
        raise DatasetError(f"clip_type {clip_type!r} and kind {kind!r} disagree; kind is the old name "
                           "of clip_type: give clip_type only")
    embeddings = request.embeddings
    if embeddings is not None:
        embeddings = os.path.abspath(check_folder(embeddings, "embeddings"))
    return dataclasses.replace(request, clip_type=clip_type or kind, kind=None, embeddings=embeddings)


def _write_empty(run: Run, empty) -> None:
    tensors = {"cond": empty[0]}
    if empty[1] is not None:
        tensors["pooled"] = empty[1]
    metadata = {"format": FORMAT_VERSION, "model_fingerprint": run.context.fingerprint,
                "options": run.context.options_json}
    sha256, _ = write_safetensors(run.out / "empty.safetensors", tensors, metadata)
    run.manifest["empty"] = {"file": "empty.safetensors", "sha256": sha256}


def encode_dataset(input: str | os.PathLike, *, model: str | os.PathLike | Sequence[str | os.PathLike],
                   out: str | os.PathLike,
                   column: str = "text", id_column: str | None = None, clip_type: str | None = None,
                   clip_skip: int | None = None, syntax: str = "comfy", truncate_long_prompts: bool = True,
                   weight_mode: str | None = None, normalization: str = "none",
                   embeddings: str | os.PathLike | None = None, on_missing_embedding: str = "warn",
                   outputs: str = "cond,pooled", dtype: str = "fp16", shard_rows: int = 10000,
                   batch_size: int = 64, engine: str = "local", workers: int = 1,
                   num_gpus_per_worker: float = 0, ray_address: str | None = None,
                   overwrite: bool = False, limit: int | None = None, dry_run: bool = False,
                   device: str | None = None, max_chars: int = 16384, max_windows: int = 64,
                   t5_min_length: int | None = None, threads: int = DEFAULT_THREADS,
                   compute_dtype: str = "fp32", dedup: bool = True, fast_pooled: bool = False,
                   progress: bool | None = None,
                   on_shard_written: Callable[[int], None] | None = None,
                   kind: str | None = None) -> DatasetReport:
    """Encode every caption of ``input`` with the text encoder(s) of ``model`` into ``out``
    (SD1, SD2, SDXL, SD3, Flux, Wan; see docs/dataset.md).

    Args:
        input: parquet file/folder/glob, ``.jsonl``, ``.txt`` or kohya caption folder.
        model: checkpoint file, several text-encoder files (a list: Flux's clip_l and
            t5xxl, SD3's clip_l, clip_g and t5xxl) or a diffusers model folder.
        out: output folder (created). Options mirror ``textenc encode-dataset``:
            ``clip_skip`` counts as A1111 does (1 = last layer, 2 = penultimate;
            ComfyUI's -1/-2 are accepted too), None keeps the kind's default
            layer; the manifest records the layer each encoder used.
            ``syntax`` is the prompt dialect (``comfy``, ``a1111``, ``compel``);
            ``truncate_long_prompts`` is compel's (True: one 77-token window;
            False: compel's chunks), recorded for ``compel`` (null for the other
            syntaxes, which refuse False); ``weight_mode`` None is the syntax's
            own. ``clip_type`` is the model type (``sd1``, ``sd2``, ``sdxl``, ``sd3``, ``flux``, ``wan``; None or
            ``"auto"``: detected), as ``textenc encode --clip-type``; ``kind`` is its old
            name, kept for one release. ``normalization`` rescales each caption's weights
            as ``textenc encode --normalization``; ``embeddings`` is the textual-inversion
            folder for ``embedding:name`` (recorded with a sha256 over its embedding files);
            ``on_missing_embedding`` is ``"warn"`` (an EmbeddingWarning, and the caption is
            encoded on: the name as text without a folder, skipped when missing from it) or
            ``"error"`` (an EmbeddingError ends the run). ``dtype`` is the stored dtype;
            ``max_chars``/``max_windows`` reject over-long captions;
            ``t5_min_length`` pads T5 (SD3, Flux, Wan) to at least that many tokens instead of
            the family's minimum (SD3 77, Flux 256, Wan 512), as a trainer's fixed length
            (kohya's ``t5xxl_max_token_length``) wants; it changes every T5 row where T5 runs
            unmasked (SD3, Flux), so it is recorded with the options;
            ``threads`` is torch's thread count in every encoding process
            (this one for the local engine, each Ray actor): the bytes depend
            on it, so it is recorded with the batch size in the manifest's
            ``compute`` and a resume with other values is refused;
            ``compute_dtype`` (``fp32``, ``bf16`` on a CPU with bf16 units or
            CUDA, ``fp16`` on CUDA, ``auto``) is the dtype the model runs in
            (recorded the same way); ``dedup`` encodes a caption repeated anywhere in
            the run once and writes it for each row, the same bytes as encoding each row
            (the report counts them as reused; with either engine);
            ``fast_pooled`` runs the layers after an intermediate layer (clip skip, SD2 and
            SDXL) for the pooled row only: faster, pooled then differs from ComfyUI's by
            fp32 rounding (recorded; see ``textenc encode --fast-pooled``);
            ``on_shard_written(index)`` is called after each shard is recorded.

    Returns:
        A :class:`DatasetReport`.

    Raises:
        DatasetError: bad input or options, or ``out`` holds another encoding
            (different options, model or input) and ``overwrite`` is False.
        LayerError: ``clip_skip`` outside the model's depth.
        EmbeddingError: ``on_missing_embedding="error"`` and an embedding that cannot be used.
        PromptError: an unknown ``syntax``; ``truncate_long_prompts=False`` with
            another syntax than ``compel``.
    """
    started = time.perf_counter()
    request = Request(**{name: value for name, value in locals().items() if name != "started"})
    _check_request(request)
    request = _resolve_request(request)
    with (torch_threads(threads), missing_embedding_policy(request.on_missing_embedding),
          first_of_kind(PromptWarning, TRUNCATION_WARNING, _more_truncated) as add_truncated):
        run, empty = _plan(request)
        if dry_run:
            return dry_run_report(run, started=started)
        return _execute(request, run, empty, started=started, on_truncated=add_truncated)


def _more_truncated(count: int) -> str:
    """One line for the captions compel's truncation cut after the first (which warned itself)."""
    return (f"{TRUNCATION_WARNING}tokens of {count} more caption(s) as well (compel's truncate_long_prompts=True "
            "keeps one window); pass truncate_long_prompts=False to keep them all")


def _options(request: Request, clip, settings: EncodeSettings) -> dict:
    """The manifest's ``options``: what the encoding depends on, each value resolved
    (so an option given with its default value is the same as one left out)."""
    options = {**dataclasses.asdict(settings), "kind": clip.clip_type, "column": request.column,
               "id_column": request.id_column, "shard_rows": request.shard_rows,
               "limit": request.limit, "dedup": request.dedup}
    options["layer"] = resolved_layers(clip, settings.layer)
    options["embeddings"] = embeddings_fingerprint(settings.embeddings)
    del options["compute_dtype"]  # a compute setting: manifest["compute"]["dtype"]
    return options


def _model_paths(model) -> str | list[str]:
    """``model`` as the Ray actors are handed it: one path, or a list of file paths."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return [os.fspath(path) for path in model]


def _check_outputs(request: Request, layout) -> None:
    """``outputs="pooled"`` needs a pooled output (Wan has none)."""
    if request.outputs == "pooled" and not layout.pooled_width:
        raise DatasetError("outputs='pooled': this model has no pooled output (Wan's UMT5 gives the "
                           "cond only); use outputs='cond,pooled'")


def _plan(request: Request) -> tuple[Run, tuple]:
    """Read the rows, load the model, build the manifest → ``(run, empty encoding)``."""
    r = request
    rows = read_captions(r.input, column=r.column, id_column=r.id_column, limit=r.limit)
    compute_dtype = resolve_compute_dtype(r.compute_dtype, resolve_device(r.device))
    clip = load_model(r.model, kind=r.clip_type, device=resolve_device(r.device), embeddings=r.embeddings)
    own = dialect_options(r.syntax, {"truncate_long_prompts": r.truncate_long_prompts})
    # Refused once, here, not caption by caption: a syntax this family does not define (SD3/Wan T5:
    # comfy only), a dialect option it does not (Flux compel: truncate_long_prompts=False) or a T5
    # minimum that the syntax cannot take (Flux compel: over its 512 chunk; SD3 a1111: any).
    probe = clip.tokenize("", syntax=r.syntax, **own)
    if r.t5_min_length is not None and is_sd3_a1111(probe):
        raise DatasetError(f"t5_min_length={r.t5_min_length}: with syntax='a1111' SD3's T5 has as many rows as its "
                           "CLIP part, as A1111 encodes it; leave t5_min_length out")
    with_min_length(clip.family, probe, r.t5_min_length)
    settings = EncodeSettings(layer=layer_for_clip_skip(clip, r.clip_skip), syntax=r.syntax,
                              truncate_long_prompts=own.get("truncate_long_prompts"),
                              weight_mode=r.weight_mode or default_weight_mode(r.syntax),
                              outputs=r.outputs, dtype=r.dtype, compute_dtype=compute_dtype,
                              max_chars=r.max_chars, max_windows=r.max_windows,
                              t5_min_length=r.t5_min_length,
                              normalization=r.normalization, embeddings=r.embeddings,
                              fast_pooled=r.fast_pooled)
    options = _options(r, clip, settings)
    # The dry run writes nothing, so it skips the sha256 over every weight.
    fingerprint = None if r.dry_run else model_fingerprint(clip)
    cast_for_compute(clip, compute_dtype)
    jobs = plan_shards(len(rows), r.shard_rows)
    encoder = CaptionEncoder(clip, settings)
    layout, empty = encoder.layout, encoder.encode_empty()
    _check_outputs(r, layout)
    manifest = base_manifest(rows, clip, fingerprint, options, jobs, layout)
    manifest["compute"] = {"dtype": compute_dtype, "threads": r.threads, "batch_size": r.batch_size}
    t5_rows = sequence_length(encoder.empty_tokens[layout.t5_role]) if layout.t5_width else 0
    context = ShardContext(fingerprint, json.dumps(options, sort_keys=True), layout.cond_width,
                           layout.pooled_width, all(isinstance(i, int) for i in rows.ids),
                           layout.window_length, r.dedup, layout.t5_width, t5_rows)
    return Run(rows, clip, settings, manifest, jobs, context, Path(r.out)), empty


def _execute(request: Request, run: Run, empty, *, started: float,
             on_truncated: Callable[[Tally], None]) -> DatasetReport:
    """Lock the output folder, check it, write the manifest and ``empty.safetensors``,
    hand the shards left to an engine (a Ray actor's compel truncations go to ``on_truncated``)."""
    r = request
    run.out.mkdir(parents=True, exist_ok=True)
    with FolderLock(run.out):  # one run per folder; see textenc.dataset.lock
        records = prepare_folder(run.out, run.manifest, overwrite=r.overwrite)
        _write_empty(run, empty)
        finish_manifest(run.manifest, records)
        write_manifest(run.out, run.manifest)
        todo = [job for job in run.jobs if job.index not in records]
        skipped = len(run.jobs) - len(todo)
        # a caption is reused across the shards of this run, with either engine
        plan = reuse_plan(run.rows, todo, run.context, r.dtype)
        if r.engine == "local":
            timings = run_local(run, todo, records, batch_size=r.batch_size, progress=r.progress,
                                on_shard_written=r.on_shard_written, plan=plan)
        else:
            timings = run_ray(run, todo, records, batch_size=r.batch_size, workers=r.workers,
                              num_gpus_per_worker=r.num_gpus_per_worker, ray_address=r.ray_address,
                              model=_model_paths(r.model), device=r.device, threads=r.threads,
                              on_shard_written=r.on_shard_written,
                              on_missing_embedding=r.on_missing_embedding, plan=plan,
                              on_truncated=on_truncated)
    report = _report(run, records, todo=todo, skipped=skipped, timings=timings, started=started)
    report.reused += reused_across_shards(plan, todo, records)
    return report


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
                         rejected=rejected, timings=timings, reused=totals["reused"])
