"""The ``textenc`` command line: ``encode``, ``inspect``, ``vision``, ``encode-dataset``.

The sub-commands live in :mod:`textenc.commands`; this module assembles them.
Every command answers alike (:mod:`textenc.commands.common`): a usage error
is one line and exit status 2; bad input (a missing file, a file of the
wrong kind, a model that is not CLIP, a full disk) is one
``textenc: error: ...`` line and exit status 1; SIGINT exits with 130 and
SIGTERM with 143. Heavy modules (torch, the models) are imported inside the
sub-commands, so ``textenc --help`` and ``textenc inspect`` stay fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .commands.common import CommandParser, run_command
from .commands.encode import add_encode, read_prompts
from .commands.inspect import add_inspect
from .commands.vision import add_vision
from .warn import missing_embedding_policy

__all__ = ["main", "build_parser", "read_prompts"]


def _add_dataset(sub, wanted: bool) -> None:
    """``encode-dataset`` comes from :mod:`textenc.dataset`, imported only when it is the
    command; for the other commands a stub keeps it listed in ``--help``."""
    if wanted:
        from . import dataset
        dataset.add_encode_dataset_arguments(sub)
    else:
        sub.add_parser("encode-dataset", help="encode a caption dataset (see textenc encode-dataset --help)",
                       add_help=False)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``textenc`` parser (``encode-dataset``'s options only when ``argv`` names it)."""
    from . import __version__

    parser = CommandParser(prog="textenc", description="CLIP text conditioning for Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"textenc {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_encode(sub)
    add_inspect(sub)
    add_vision(sub)
    command = next((a for a in argv if not a.startswith("-")), None)
    _add_dataset(sub, command == "encode-dataset")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 1 error, 2 usage, 130/143 signal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as done:  # --help, --version (0) or a usage error (2), already printed
        return done.code if isinstance(done.code, int) else 2
    return run_command(lambda: _run(args), prog="textenc")


def _run(args: argparse.Namespace) -> int:
    with missing_embedding_policy(getattr(args, "on_missing_embedding", "warn")):
        return args.run(args)
