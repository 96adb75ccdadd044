"""Command-line front end of :func:`textenc.dataset.encode_dataset`.

``add_encode_dataset_arguments(subparsers)`` adds the ``encode-dataset``
sub-command to a ``textenc`` parser; ``run_encode_dataset(args)`` runs it and
returns the exit status (0 ok, 2 on a DatasetError or another textenc error,
printed as one line on stderr). ``main(argv)`` is ``python -m textenc.dataset``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import TextencError
from .compute import COMPUTE_DTYPES, DEFAULT_THREADS
from .driver import encode_dataset
from .dry_run import format_plan

__all__ = ["add_encode_dataset_arguments", "configure_parser", "run_encode_dataset", "main"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the encode-dataset options to ``parser``."""
    add = parser.add_argument
    add("input", help="parquet file/folder/glob, .jsonl, .txt (one caption per line) "
                      "or a folder of kohya .txt caption files")
    add("--model", required=True, help="checkpoint file or diffusers model folder")
    add("--out", required=True, help="output folder (shard-*.safetensors, empty.safetensors, manifest.json)")
    add("--column", default="text", help="caption column (parquet, jsonl; default: text)")
    add("--id-column", default=None, help="id column (default: the row index)")
    add("--kind", choices=("sd1", "sd2", "sdxl"), default=None, help="model kind (default: detected)")
    add("--clip-skip", type=_positive, default=None,
        help="use the N-th layer from the end (2 = penultimate; default: the kind's default)")
    add("--weight-mode", choices=("comfy", "a1111", "a1111_no_norm", "compel", "none"), default=None,
        help="prompt-weight interpretation (default: comfy)")
    add("--outputs", choices=("cond,pooled", "pooled"), default="cond,pooled")
    add("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="stored dtype (default fp16)")
    add("--shard-rows", type=_positive, default=10000, help="input rows per shard (default 10000)")
    add("--batch-size", type=_positive, default=64, help="captions per forward (default 64)")
    add("--engine", choices=("local", "ray"), default="local")
    add("--workers", type=_positive, default=1, help="ray actors (default 1)")
    add("--num-gpus-per-worker", type=float, default=0.0, help="GPUs per ray actor (default 0)")
    add("--ray-address", default=None, help="join this Ray cluster (default: start one locally)")
    add("--threads", type=_positive, default=DEFAULT_THREADS,
        help="torch threads per encoding process, the local engine's and each Ray actor's; "
             "the shards' bytes depend on it (recorded; default %(default)s)")
    add("--compute-dtype", choices=COMPUTE_DTYPES, default="fp32",
        help="dtype the model runs in: bf16 needs a CPU with bf16 units (AVX512-BF16/AMX) "
             "or CUDA, fp16 CUDA; auto picks bf16 where it is fast, else fp32 "
             "(recorded; default %(default)s)")
    add("--no-dedup", action="store_true",
        help="encode every row even when its caption repeats one earlier in its shard "
             "(default: repeats are encoded once and written for each row)")
    add("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add("--max-chars", type=_positive, default=16384, help="reject longer captions (default 16384)")
    add("--max-windows", type=_positive, default=64, help="reject captions needing more 77-token windows")
    add("--overwrite", action="store_true", help="replace an output folder encoded differently")
    add("--limit", type=_positive, default=None, help="encode only the first N rows")
    add("--dry-run", action="store_true", help="print the plan, encode nothing")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def add_encode_dataset_arguments(subparsers) -> argparse.ArgumentParser:
    """Add ``encode-dataset`` to an ``argparse`` sub-parsers object; returns its parser."""
    parser = subparsers.add_parser("encode-dataset", help="encode a caption dataset into shards",
                                   description="Encode every caption of INPUT into sharded safetensors.")
    configure_parser(parser)
    parser.set_defaults(run=run_encode_dataset)
    return parser


def run_encode_dataset(args: argparse.Namespace) -> int:
    """Run ``encode-dataset`` from parsed arguments → exit status."""
    try:
        report = encode_dataset(
            args.input, model=args.model, out=args.out, column=args.column, id_column=args.id_column,
            kind=args.kind, clip_skip=args.clip_skip, weight_mode=args.weight_mode,
            outputs=args.outputs, dtype=args.dtype, shard_rows=args.shard_rows,
            batch_size=args.batch_size, engine=args.engine, workers=args.workers,
            num_gpus_per_worker=args.num_gpus_per_worker, ray_address=args.ray_address,
            overwrite=args.overwrite, limit=args.limit, dry_run=args.dry_run, device=args.device,
            max_chars=args.max_chars, max_windows=args.max_windows, threads=args.threads,
            compute_dtype=args.compute_dtype, dedup=not args.no_dedup,
            progress=False if args.no_progress else None)
    except TextencError as exc:
        print(f"textenc encode-dataset: error: {exc}", file=sys.stderr)
        return 2
    if report.dry_run:
        print(format_plan(report))
    else:
        print(report.summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m textenc.dataset INPUT --model M --out DIR [options]``."""
    parser = configure_parser(argparse.ArgumentParser(
        prog="python -m textenc.dataset", description="Encode every caption of INPUT into sharded safetensors."))
    return run_encode_dataset(parser.parse_args(argv))
