"""Command-line front end of :func:`textenc.dataset.encode_dataset`.

``add_encode_dataset_arguments(subparsers)`` adds the ``encode-dataset``
sub-command to a ``textenc`` parser; ``run_encode_dataset(args)`` runs it;
``main(argv)`` is ``python -m textenc.dataset``.

Both entry points use :mod:`textenc.commands.common`, like every textenc
command: the same parser class (help shows every default, choices as typed),
usage errors as one line plus "see --help" with exit status 2, runtime errors
(a textenc error, an ``OSError``, a ``UnicodeDecodeError``) as one line on
stderr naming the path involved with exit status 1, and SIGINT / SIGTERM as
exit status 130 / 143 with one line saying how many shards are finished and
that running the same command again resumes.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from ..commands.common import (FAST_POOLED_HELP, PROGRESS_HELP, CommandParser, add_dialect_flags, add_embedding_options, check_folder,
                               describe_error, dialect_flag_options, positive_int, run_command)
from ..prompts.dialects import DEFAULT_SYNTAX, SYNTAXES, default_weight_mode
from ..errors import DatasetError, TextencError
from ..text_encoders.weighting import NORMALIZATIONS, WEIGHT_MODES
from .compute import COMPUTE_DTYPES, DEFAULT_THREADS
from .driver import KINDS, OUTPUTS, encode_dataset
from .dry_run import format_plan
from .encode import OUTPUT_DTYPES
from .engines import ENGINES
from .format import read_manifest

__all__ = ["add_encode_dataset_arguments", "configure_parser", "build_parser", "run_encode_dataset",
           "main", "PROG", "DESCRIPTION"]

PROG = "python -m textenc.dataset"
DESCRIPTION = "Encode every caption of INPUT into sharded safetensors."

def _clip_skip(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number such as 2 or -2, got {text!r}") from None


def _syntax_weight_modes() -> str:
    return ", ".join(f"{name}: {default_weight_mode(name)}" for name in SYNTAXES)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--clip-type", choices=("auto", *KINDS), default="auto",
        help="model type, as textenc encode --clip-type; auto detects it from the weights "
             "(default: %(default)s)")
    add("--kind", dest="clip_type", choices=("auto", *KINDS), default=argparse.SUPPRESS,
        help=argparse.SUPPRESS)  # the old name of --clip-type, kept for one release
    add("--clip-skip", type=_clip_skip, default=None, metavar="N",
        help="A1111/civitai clip skip: 1 = the last layer, 2 = the penultimate, up to the model's "
             "depth; ComfyUI's -1/-2 mean the same (default: the kind's own layer: last for SD1, "
             "penultimate for SD2 and SDXL)")
    add("--syntax", choices=SYNTAXES, default=DEFAULT_SYNTAX,
        help="prompt syntax of the captions (default: %(default)s)")
    add_dialect_flags(parser)
    add("--weight-mode", choices=WEIGHT_MODES, default=None,
        help=f"how prompt weights apply (default: the syntax's own: {_syntax_weight_modes()})")
    add("--normalization", choices=NORMALIZATIONS, default="none",
        help="rescaling of the weights of each caption, as textenc encode --normalization "
             "(recorded; default: %(default)s)")
    add_embedding_options(parser)  # the folder is recorded with a sha256 of its embedding files
    add("--fast-pooled", action="store_true",
        help=FAST_POOLED_HELP + " (recorded)")
    add("--compute-dtype", choices=COMPUTE_DTYPES, default="fp32",
        help="dtype the model runs in: bf16 needs a CPU with bf16 units (AVX512-BF16/AMX) "
             "or CUDA, fp16 CUDA; auto picks bf16 where it is fast, else fp32 "
             "(recorded; default: %(default)s)")
    add("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")


def _add_output_options(add) -> None:
    # A choice holds a comma: written out as HelpFormatter writes choices, also for a
    # plain ArgumentParser (whose "{cond,pooled,pooled}" would read as three choices).
    add("--outputs", choices=OUTPUTS, default="cond,pooled", metavar="{" + "|".join(OUTPUTS) + "}",
        help="what each shard holds: 'cond,pooled' (both) or 'pooled' (pooled only) "
             "(default: %(default)s)")
    add("--dtype", choices=tuple(OUTPUT_DTYPES), default="fp16", help="stored dtype (default: %(default)s)")
    add("--shard-rows", type=positive_int, default=10000, help="input rows per shard (default: %(default)s)")
    add("--max-chars", type=positive_int, default=16384,
        help="reject captions with more characters (default: %(default)s)")
    add("--max-windows", type=positive_int, default=64,
        help="reject captions needing more 77-token windows (default: %(default)s)")
    add("--t5-min-length", type=positive_int, default=None, metavar="N",
        help="SD3, Flux, Wan: pad T5 to at least N tokens, as a trainer's fixed length (kohya's "
             "t5xxl_max_token_length) wants; changes the T5 rows (recorded; default: the family's "
             "minimum: SD3 77, Flux 256, Wan 512)")
    add("--no-dedup", action="store_true",
        help="encode every row even when its caption repeats an earlier one "
             "(default: off: a repeat anywhere in the run is encoded once and written for each row; "
             "the bytes are the same)")
    add("--overwrite", action="store_true",
        help="replace an output folder encoded with other options, model or input (default: off)")
    add("--limit", type=positive_int, default=None, help="encode only the first N rows (default: all)")


def _add_engine_options(add) -> None:
    add("--engine", choices=ENGINES, default="local",
        help="local: this process; ray: Ray actors (extra textenc[ray]) (default: %(default)s)")
    add("--workers", type=positive_int, default=1, help="Ray actors (default: %(default)s)")
    add("--threads", type=positive_int, default=DEFAULT_THREADS,
        help="torch threads per encoding process, the local engine's and each Ray actor's; "
             "the shards' bytes depend on it (recorded; default: %(default)s)")
    add("--batch-size", type=positive_int, default=64,
        help="captions per forward; recorded, the bytes depend on it (default: %(default)s)")
    add("--num-gpus-per-worker", type=float, default=0.0, help="GPUs per Ray actor (default: %(default)s)")
    add("--ray-address", default=None, help="join this Ray cluster (default: start one locally)")
    add("--dry-run", action="store_true", help="print the plan, encode nothing (default: off)")
    add("--no-progress", action="store_true", help="no progress bar (default: a bar on a terminal)")
    add("--progress", action="store_true", help=PROGRESS_HELP)
    add("--verbose", action="store_true", help="also print Ray's own INFO and WARNING lines (default: off)")


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the encode-dataset options to ``parser``."""
    add = parser.add_argument
    add("input", help="parquet file/folder/glob, .jsonl, .txt (one caption per line) "
                      "or a folder of kohya .txt caption files")
    add("--model", required=True, action="append",
        help="checkpoint file or diffusers model folder; repeat it for several text-encoder files "
             "(Flux: --model clip_l.safetensors --model t5xxl_fp16.safetensors) (required)")
    add("--out", required=True,
        help="output folder (shard-*.safetensors, empty.safetensors, manifest.json) (required)")
    add("--column", default="text", help="caption column (parquet, jsonl; default: %(default)s)")
    add("--id-column", default=None, help="id column (default: the row index)")
    _add_model_options(parser)
    _add_output_options(add)
    _add_engine_options(add)
    return parser


def add_encode_dataset_arguments(subparsers) -> argparse.ArgumentParser:
    """Add ``encode-dataset`` to an ``argparse`` sub-parsers object; returns its parser."""
    parser = subparsers.add_parser("encode-dataset", help="encode a caption dataset into shards",
                                   description=DESCRIPTION)
    configure_parser(parser)
    parser.set_defaults(run=run_encode_dataset)
    return parser


def _finished_shards(out: str) -> tuple[int, object] | None:
    """``(shards finished, shards planned)`` in the folder ``out``; None without a manifest."""
    try:
        manifest = read_manifest(out)
    except (TextencError, OSError):
        return None
    if manifest is None:
        return None
    return len(manifest.get("shards", [])), manifest.get("num_shards", "?")


def _progress_phrase(out: str) -> str:
    finished = _finished_shards(out)
    if finished is None:
        return "no shard is finished"
    return f"{finished[0]} of {finished[1]} shards are finished"


def _encode(args: argparse.Namespace):
    return encode_dataset(
        args.input, model=args.model[0] if len(args.model) == 1 else args.model, out=args.out,
        column=args.column, id_column=args.id_column,
        clip_type=args.clip_type, clip_skip=args.clip_skip, syntax=args.syntax, **dialect_flag_options(args),
        weight_mode=args.weight_mode, normalization=args.normalization, embeddings=args.embeddings,
        on_missing_embedding=args.on_missing_embedding,
        outputs=args.outputs, dtype=args.dtype, shard_rows=args.shard_rows,
        batch_size=args.batch_size, engine=args.engine, workers=args.workers,
        num_gpus_per_worker=args.num_gpus_per_worker, ray_address=args.ray_address,
        overwrite=args.overwrite, limit=args.limit, dry_run=args.dry_run, device=args.device,
        max_chars=args.max_chars, max_windows=args.max_windows, t5_min_length=args.t5_min_length,
        threads=args.threads,
        compute_dtype=args.compute_dtype, dedup=not args.no_dedup, fast_pooled=args.fast_pooled,
        progress=False if args.no_progress else True if args.progress else None)


def run_encode_dataset(args: argparse.Namespace) -> int:
    """Run ``encode-dataset`` from parsed arguments; returns 0 and prints the summary.

    Meant to run inside :func:`~textenc.commands.common.run_command`, which
    turns what this raises into one line and an exit status.

    Raises:
        TextencError: any runtime fault, naming the path (a caption file that is
            not UTF-8 names that file). OSError: a file system fault.
        KeyboardInterrupt: SIGINT or SIGTERM, re-raised with how many shards are
            finished and that running the same command again resumes.
    """
    if args.embeddings is not None:
        check_folder(args.embeddings, "--embeddings")
    if args.verbose:  # Ray's own INFO and WARNING lines too (see textenc.dataset.engines.ray)
        logging.getLogger("textenc").setLevel(logging.INFO)
    try:
        report = _encode(args)
    except KeyboardInterrupt as interrupt:
        raise type(interrupt)(f"{_progress_phrase(args.out)} in {args.out}; "
                              "run the same command again to resume") from None
    except UnicodeDecodeError as error:
        raise DatasetError(describe_error(error, path=args.input)) from None
    except OSError as error:
        raise DatasetError(_os_error_line(error, args)) from None
    print(format_plan(report) if report.dry_run else report.summary())
    return 0


def _os_error_line(error: OSError, args: argparse.Namespace) -> str:
    """The shared one-line form of ``error``, plus how to resume when shards are finished."""
    line = describe_error(error) if error.filename else f"{args.out}: {describe_error(error)}"
    if _finished_shards(args.out) is None:
        return line
    return f"{line}; {_progress_phrase(args.out)}: run the same command again to resume"


def build_parser(prog: str = PROG) -> CommandParser:
    """The parser of ``python -m textenc.dataset`` (the options of ``textenc encode-dataset``)."""
    return configure_parser(CommandParser(prog=prog, description=DESCRIPTION))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m textenc.dataset INPUT --model M --out DIR [options]`` → exit status."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: run_encode_dataset(args), prog=PROG)
