"""Command-line front end of :func:`textenc.dataset.encode_dataset`.

``add_encode_dataset_arguments(subparsers)`` adds the ``encode-dataset``
sub-command to a ``textenc`` parser; ``run_encode_dataset(args)`` runs it and
returns the exit status; ``main(argv)`` is ``python -m textenc.dataset``.

Exit statuses: 0 done; 1 any runtime error (a textenc error, or an ``OSError``
or ``UnicodeDecodeError``), printed as one line on stderr that names the path
involved; 2 a usage error (one line plus "see --help"); 130 / 143 interrupted
by SIGINT / SIGTERM, with one line saying how many shards are finished and
that running the same command again resumes.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, Iterator, NoReturn, Sequence

from ..dialects import DEFAULT_SYNTAX, SYNTAXES, default_weight_mode
from ..errors import TextencError
from ..weighting import WEIGHT_MODES
from .compute import COMPUTE_DTYPES, DEFAULT_THREADS
from .driver import KINDS, OUTPUTS, encode_dataset
from .dry_run import format_plan
from .encode import OUTPUT_DTYPES
from .engines import ENGINES
from .format import read_manifest

__all__ = ["add_encode_dataset_arguments", "configure_parser", "run_encode_dataset", "main"]

PROG = "textenc encode-dataset"
_EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _clip_skip(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number such as 2 or -2, got {text!r}") from None


def _syntax_weight_modes() -> str:
    return ", ".join(f"{name}: {default_weight_mode(name)}" for name in SYNTAXES)


def _add_model_options(add) -> None:
    add("--kind", choices=KINDS, default=None, help="model kind (default: detected from the file)")
    add("--clip-skip", type=_clip_skip, default=None, metavar="N",
        help="A1111/civitai clip skip: 1 = the last layer, 2 = the penultimate, up to the model's "
             "depth; ComfyUI's -1/-2 mean the same (default: the kind's own layer: last for SD1, "
             "penultimate for SD2 and SDXL)")
    add("--syntax", choices=SYNTAXES, default=DEFAULT_SYNTAX,
        help="prompt syntax of the captions (default: %(default)s)")
    add("--weight-mode", choices=WEIGHT_MODES, default=None,
        help=f"how prompt weights apply (default: the syntax's own: {_syntax_weight_modes()})")
    add("--compute-dtype", choices=COMPUTE_DTYPES, default="fp32",
        help="dtype the model runs in: bf16 needs a CPU with bf16 units (AVX512-BF16/AMX) "
             "or CUDA, fp16 CUDA; auto picks bf16 where it is fast, else fp32 "
             "(recorded; default: %(default)s)")
    add("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")


def _add_output_options(add) -> None:
    add("--outputs", choices=OUTPUTS, default="cond,pooled", metavar="{cond+pooled,pooled}",
        help="what each shard holds: 'cond,pooled' (both) or 'pooled' (pooled only) "
             "(default: %(default)s)")
    add("--dtype", choices=tuple(OUTPUT_DTYPES), default="fp16", help="stored dtype (default: %(default)s)")
    add("--shard-rows", type=_positive, default=10000, help="input rows per shard (default: %(default)s)")
    add("--max-chars", type=_positive, default=16384,
        help="reject captions with more characters (default: %(default)s)")
    add("--max-windows", type=_positive, default=64,
        help="reject captions needing more 77-token windows (default: %(default)s)")
    add("--no-dedup", action="store_true",
        help="encode every row even when its caption repeats one earlier in its shard "
             "(default: off: a repeat is encoded once and written for each row)")
    add("--overwrite", action="store_true",
        help="replace an output folder encoded with other options, model or input (default: off)")
    add("--limit", type=_positive, default=None, help="encode only the first N rows (default: all)")


def _add_engine_options(add) -> None:
    add("--engine", choices=ENGINES, default="local",
        help="local: this process; ray: Ray actors (extra textenc[ray]) (default: %(default)s)")
    add("--workers", type=_positive, default=1, help="Ray actors (default: %(default)s)")
    add("--threads", type=_positive, default=DEFAULT_THREADS,
        help="torch threads per encoding process, the local engine's and each Ray actor's; "
             "the shards' bytes depend on it (recorded; default: %(default)s)")
    add("--batch-size", type=_positive, default=64,
        help="captions per forward; recorded, the bytes depend on it (default: %(default)s)")
    add("--num-gpus-per-worker", type=float, default=0.0, help="GPUs per Ray actor (default: %(default)s)")
    add("--ray-address", default=None, help="join this Ray cluster (default: start one locally)")
    add("--dry-run", action="store_true", help="print the plan, encode nothing (default: off)")
    add("--no-progress", action="store_true", help="no progress bar (default: a bar on a terminal)")


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the encode-dataset options to ``parser``."""
    add = parser.add_argument
    add("input", help="parquet file/folder/glob, .jsonl, .txt (one caption per line) "
                      "or a folder of kohya .txt caption files")
    add("--model", required=True, help="checkpoint file or diffusers model folder")
    add("--out", required=True, help="output folder (shard-*.safetensors, empty.safetensors, manifest.json)")
    add("--column", default="text", help="caption column (parquet, jsonl; default: %(default)s)")
    add("--id-column", default=None, help="id column (default: the row index)")
    _add_model_options(add)
    _add_output_options(add)
    _add_engine_options(add)
    return parser


def add_encode_dataset_arguments(subparsers) -> argparse.ArgumentParser:
    """Add ``encode-dataset`` to an ``argparse`` sub-parsers object; returns its parser."""
    parser = subparsers.add_parser("encode-dataset", help="encode a caption dataset into shards",
                                   description="Encode every caption of INPUT into sharded safetensors.")
    configure_parser(parser)
    parser.set_defaults(run=run_encode_dataset)
    return parser


class _Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; unwinds the run like KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _InterruptOnSignals:
    """Turn SIGINT and SIGTERM into :class:`_Interrupted` while the run lasts (main thread only)."""

    def __enter__(self) -> "_InterruptOnSignals":
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in _EXIT_STATUS:
                self.previous[signum] = signal.signal(signum, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame) -> NoReturn:
        raise _Interrupted(signum)

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _finished_shards(out: str) -> str:
    try:
        manifest = read_manifest(out)
    except (TextencError, OSError):
        manifest = None
    if manifest is None:
        return "no shard is finished"
    return f"{len(manifest.get('shards', []))} of {manifest.get('num_shards', '?')} shards are finished"


def _error_line(exc: BaseException, args: argparse.Namespace) -> str:
    """One line for a runtime error, naming the path involved and what to do."""
    if isinstance(exc, TextencError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return f"{args.input}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
    path = getattr(exc, "filename", None) or args.out  # an OSError
    return (f"{path}: {getattr(exc, 'strerror', None) or exc}; check that the path exists, is "
            "writable and its disk has space, then run the same command again (it resumes)")


def _encode(args: argparse.Namespace):
    return encode_dataset(
        args.input, model=args.model, out=args.out, column=args.column, id_column=args.id_column,
        kind=args.kind, clip_skip=args.clip_skip, syntax=args.syntax, weight_mode=args.weight_mode,
        outputs=args.outputs, dtype=args.dtype, shard_rows=args.shard_rows,
        batch_size=args.batch_size, engine=args.engine, workers=args.workers,
        num_gpus_per_worker=args.num_gpus_per_worker, ray_address=args.ray_address,
        overwrite=args.overwrite, limit=args.limit, dry_run=args.dry_run, device=args.device,
        max_chars=args.max_chars, max_windows=args.max_windows, threads=args.threads,
        compute_dtype=args.compute_dtype, dedup=not args.no_dedup,
        progress=False if args.no_progress else None)


def run_encode_dataset(args: argparse.Namespace) -> int:
    """Run ``encode-dataset`` from parsed arguments → exit status (see the module docstring)."""
    try:
        with _InterruptOnSignals():
            report = _encode(args)
    except (_Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, _Interrupted) else signal.SIGINT
        print(f"{PROG}: interrupted ({signal.Signals(signum).name}): {_finished_shards(args.out)} "
              f"in {args.out}; run the same command again to resume", file=sys.stderr)
        return _EXIT_STATUS[signum]
    except (TextencError, OSError, UnicodeDecodeError) as exc:
        print(f"{PROG}: error: {_error_line(exc, args)}", file=sys.stderr)
        return 1
    print(format_plan(report) if report.dry_run else report.summary())
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """A usage error is one line plus "see --help", exit status 2 (not the usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m textenc.dataset INPUT --model M --out DIR [options]``."""
    parser = configure_parser(_OneLineParser(
        prog="python -m textenc.dataset", description="Encode every caption of INPUT into sharded safetensors."))
    return run_encode_dataset(parser.parse_args(argv))
