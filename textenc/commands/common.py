"""What every textenc command line shares: its parser class (:mod:`.parser`, re-exported
here), its exit statuses, how a fault becomes one line, shared options and checks of
``--out``/``--embeddings``.

Used by ``textenc`` / ``python -m textenc`` (:mod:`textenc.cli`) and meant for
``python -m textenc.dataset`` as well, so that every command answers alike:

* a usage error (unknown option, bad value, missing argument) prints one line
  ``PROG: error: ...; see 'PROG --help'`` and exits with status 2;
* a runtime error a user can cause (:class:`~textenc.errors.TextencError`,
  ``OSError``, ``UnicodeError``) prints one line naming the path or value and
  what to do, and exits with status 1 — never a traceback;
* SIGINT exits with status 130 and SIGTERM with 143, after one line.

>>> parser = CommandParser(prog="demo")
>>> _ = parser.add_argument("--size", type=int, default=3, help="how big")
>>> "(default: 3)" in parser.format_help()
True
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import signal
import sys
import tempfile
import threading
import warnings
from typing import Callable, Iterator

from ..prompts.dialects import DIALECT_OPTIONS, dialect_options
from ..errors import TextencError
from ..warn import ON_MISSING_EMBEDDING
from .parser import (EXIT_USAGE, CommandParser, HelpFormatter, did_you_mean, one_line,  # noqa: F401 (re-exported)
                     positive_int)

__all__ = ["EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_SIGINT", "EXIT_SIGTERM", "CommandParser",
           "HelpFormatter", "Terminated", "did_you_mean", "add_embedding_options", "EMBEDDINGS_HELP",
           "ON_MISSING_HELP", "add_progress_flag", "command_line_words", "run_command", "positive_int",
           "add_dialect_flags", "dialect_flag_options", "describe_error", "one_line", "show_path",
           "check_out_file", "check_out_folder", "check_folder", "write_file_atomically", "progress"]

EXIT_OK, EXIT_ERROR = 0, 1
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143: the shell's convention


def show_path(path: str | os.PathLike) -> str:
    """A path as text that can always be printed: bytes that are not UTF-8 as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# --- embeddings -------------------------------------------------------------------

EMBEDDINGS_HELP = ("textual-inversion folder for embedding:name (default: none: each embedding:name is then "
                   "encoded as plain text, as ComfyUI does, with a warning; a name missing from the folder is "
                   "left out of the prompt, with a warning)")
ON_MISSING_HELP = ("warn: an embedding:name that cannot be used (no --embeddings folder, not in it, or refused) "
                   "is a warning and the prompt goes on as --embeddings says; error: it ends the command with "
                   "exit status 1 (default: %(default)s)")


def add_embedding_options(parser: argparse.ArgumentParser) -> None:
    """``--embeddings DIR`` and ``--on-missing-embedding warn|error`` (``textenc``'s main applies
    ``args.on_missing_embedding`` with :func:`textenc.warn.missing_embedding_policy`)."""
    parser.add_argument("--embeddings", metavar="DIR", default=None, help=EMBEDDINGS_HELP)
    parser.add_argument("--on-missing-embedding", choices=ON_MISSING_EMBEDDING, default="warn",
                        help=ON_MISSING_HELP)


# --- a dialect's own options -------------------------------------------------------

#: compel's ``truncate_long_prompts`` (default True) as a flag that turns it off.
TRUNCATE_FLAG = "--no-truncate-long-prompts"
TRUNCATE_HELP = ("--syntax compel only: cut a prompt longer than 75 tokens into several 77-token windows, as "
                 "compel's truncate_long_prompts=False does (after the last '.' that fits, else the last "
                 "',' ';' ':', else the last whole word) (default: off: compel's default, one window with "
                 "the first 75 tokens)")


def add_dialect_flags(parser: argparse.ArgumentParser) -> None:
    """Add the dialects' own options (:data:`textenc.prompts.dialects.DIALECT_OPTIONS`) to a parser
    that has ``--syntax``; on a :class:`CommandParser`, one given with another syntax is a
    usage error (exit 2)."""
    parser.add_argument(TRUNCATE_FLAG, action="store_true", help=TRUNCATE_HELP)
    if isinstance(parser, CommandParser):
        parser.add_check(_check_dialect_flags)


def _check_dialect_flags(args: argparse.Namespace) -> str | None:
    owner = DIALECT_OPTIONS["truncate_long_prompts"][0]
    if not args.no_truncate_long_prompts or args.syntax == owner:
        return None
    return (f"{TRUNCATE_FLAG} is an option of --syntax {owner} only (compel's truncate_long_prompts); "
            f"--syntax {args.syntax} has no such option: drop it or use --syntax {owner}")


def dialect_flag_options(args: argparse.Namespace) -> dict:
    """The dialect options of parsed ``args``, resolved for ``args.syntax``: the
    keywords of ``tokenize`` (``{"truncate_long_prompts": False}`` for compel with
    :data:`TRUNCATE_FLAG`, ``{}`` for comfy), also what a command records.

    Raises:
        PromptError: a flag with another syntax (a parser without the check).
    """
    return dialect_options(args.syntax, {"truncate_long_prompts": not args.no_truncate_long_prompts})


# --- faults -----------------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread the way SIGINT raises ``KeyboardInterrupt``,
    so ``finally`` blocks and cleanup run for both."""

    exit_status = EXIT_SIGTERM


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EFBIG: "the file exceeds the file-size limit (ulimit -f): raise it or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "permission denied: check the permissions or choose another location",
    errno.EPERM: "operation not permitted: check the permissions or choose another location",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EISDIR: "it is a folder: give a file path",
    errno.EEXIST: "it exists already and is in the way (a file where a folder is needed?): "
                  "remove it or choose another path",
    errno.ENOTDIR: "a part of the path is not a folder: check the path",
    errno.ENAMETOOLONG: "the name is too long: use a shorter path",
    errno.EIO: "input/output error: the disk or network share failed; check it and re-run",
}


def describe_error(error: BaseException, *, path: str | os.PathLike | None = None) -> str:
    """One line for a fault a user can cause: what went wrong, where, and what to do.

    ``path`` names the file being read when the error itself cannot (a
    ``UnicodeDecodeError`` knows no file name).
    """
    if isinstance(error, OSError):
        paths = [show_path(p) for p in (error.filename, error.filename2) if p is not None]
        reason = _OS_HINTS.get(error.errno or -1) or error.strerror or one_line(error)
        return f"{' -> '.join(paths)}: {reason}" if paths else one_line(f"{reason} ({error})")
    if isinstance(error, UnicodeDecodeError):
        where = "input is" if path is None else f"{show_path(path)}:"
        return (f"{where} not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                f"{error.start}); save it as UTF-8")
    if isinstance(error, UnicodeError):
        return f"text that cannot be written as UTF-8 ({one_line(error)}); remove the odd characters"
    return one_line(error)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` (main thread only: elsewhere
    Python cannot install signal handlers, and the default action stays)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: Python parameters that library messages name, as the command line spells them.
_COMMAND_LINE_SPELLINGS = ((re.compile(r"\bpass max_weight= "), "pass --max-weight W "),
                           (re.compile(r"\bmax_weight=(?=\d)"), "--max-weight "),
                           (re.compile(r"\braise max_weight\b"), "raise --max-weight"),
                           (re.compile(r"\bpass truncate_long_prompts=False\b"), f"pass {TRUNCATE_FLAG}"),
                           (re.compile(r"\bclip_skip (?=-?\d)"), "--clip-skip "),
                           (re.compile(r"\bclip_type[= ]'([\w.-]+)'"), r"--clip-type \1"),
                           (re.compile(r"\bpass clip_type explicitly\b"), "pass --clip-type"))


def command_line_words(text: str) -> str:
    """``text`` with the Python parameters it names written as the command-line options.

    >>> command_line_words("weight 500; pass max_weight= to refuse them")
    'weight 500; pass --max-weight W to refuse them'
    >>> command_line_words("pass truncate_long_prompts=False to keep them all")
    'pass --no-truncate-long-prompts to keep them all'
    >>> command_line_words("clip_type 'flux' (Flux) takes ...; pass clip_type='wan'")
    '--clip-type flux (Flux) takes ...; pass --clip-type wan'
    """
    for pattern, spelling in _COMMAND_LINE_SPELLINGS:
        text = pattern.sub(spelling, text)
    return text


def _warning_printer(prog: str):
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {command_line_words(one_line(message))}", file=sys.stderr)
    return show


def run_command(run: Callable[[], int], *, prog: str) -> int:
    """Call ``run()`` and turn what it raises into an exit status and one line on stderr.

    ``KeyboardInterrupt`` (SIGINT) → 130 and :class:`Terminated` (SIGTERM) → 143,
    printing ``PROG: interrupted (SIGINT)`` (or ``terminated (SIGTERM)``) plus
    the exception's text when it has one: a command can re-raise
    ``type(exc)("3 of 8 shards finished; re-run to resume")`` to say more. ``TextencError``, ``OSError`` and ``UnicodeError`` → 1 with
    :func:`describe_error`'s line. Warnings print as ``PROG: warning: ...``.
    Anything else is a bug and propagates.
    """
    with _sigterm_raises(), warnings.catch_warnings():
        warnings.showwarning = _warning_printer(prog)
        try:
            return int(run())
        except KeyboardInterrupt as interrupt:
            status = getattr(interrupt, "exit_status", EXIT_SIGINT)
            what = "interrupted (SIGINT)" if status == EXIT_SIGINT else "terminated (SIGTERM)"
            detail = one_line(interrupt)
            print(f"{prog}: {what}{'; ' + detail if detail else ''}", file=sys.stderr)
            return status
        except BrokenPipeError:  # the reader left (``textenc inspect ... | head``): nothing to say
            _silence_stdout()
            return EXIT_ERROR
        except (TextencError, OSError, UnicodeError) as error:
            print(f"{prog}: error: {command_line_words(describe_error(error))}", file=sys.stderr)
            return EXIT_ERROR


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so flushing it at exit raises no second BrokenPipeError."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


FAST_POOLED_HELP = ("at an intermediate layer (--clip-skip 2 or more; SD2 and SDXL by default), run the "
                    "layers after it for the pooled row only: one layer fewer for all but one row (about "
                    "7-12%% less CPU time for SD1 at clip skip 2, ~3%% for SD2 and SDXL), and pooled "
                    "differs from ComfyUI's by fp32 rounding (at most 2.5e-6); cond is the same (default: off, ComfyUI's bits)")

PROGRESS_HELP = "show a progress bar even when stderr is not a terminal (default: off: a bar only on a terminal)"


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    """``--progress``: a bar even when stderr is not a terminal (a log file, a pipe)."""
    parser.add_argument("--progress", action="store_true", help=PROGRESS_HELP)


def progress(items: list, description: str, unit: str = "item", *, enabled: bool | None = None):
    """``items`` wrapped in a tqdm bar on stderr when there are several and tqdm is installed:
    ``enabled`` True always, None (default) only when stderr is a terminal, False never."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if len(items) < 2 or not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, unit=unit, file=sys.stderr)


# --- paths ------------------------------------------------------------------------

def check_folder(path: str | os.PathLike, option: str) -> str:
    """``path`` if it is an existing folder, else a TextencError naming ``option``."""
    text = os.fspath(path)
    if not os.path.exists(text):
        raise TextencError(f"{option} {show_path(text)}: the folder does not exist")
    if not os.path.isdir(text):
        raise TextencError(f"{option} {show_path(text)}: not a folder; give the folder that holds the files")
    return text


def check_out_file(path: str | os.PathLike, *, suffix: str, option: str = "--out") -> str:
    """Check that ``path`` can become an output file, before any work is done.

    It must end with ``suffix``, not be a folder or another non-regular file,
    and its folder must exist and accept a new file (checked by creating and
    removing an empty temporary file, so read-only mounts and permissions are
    caught even when running as root).

    Raises:
        TextencError: naming ``option``, the path and the fix.
    """
    text = os.fspath(path)
    shown = show_path(text)
    if os.path.isdir(text):
        raise TextencError(f"{option} {shown}: is a folder; give a file path such as "
                           f"{os.path.join(shown, 'out' + suffix)}")
    if os.path.lexists(text) and not os.path.isfile(text):
        raise TextencError(f"{option} {shown}: exists and is not a regular file; choose another name")
    if not text.endswith(suffix):
        raise TextencError(f"{option} {shown}: the output is a {suffix} file; name it *{suffix}")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise TextencError(f"{option} {shown}: folder {show_path(folder)} does not exist; create it first")
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".textenc-", suffix=".probe")
    except OSError as error:
        raise TextencError(f"{option} {shown}: cannot write in folder {show_path(folder)} "
                           f"({error.strerror}); choose a writable location") from None
    os.close(handle)
    os.unlink(probe)
    return text


def check_out_folder(path: str | os.PathLike, *, option: str = "--out") -> str:
    """Check that ``path`` is, or can become, a folder to write in, before any work is done.

    An existing ``path`` must be a folder that accepts a new file; a missing one must
    have, above it, an existing folder that accepts a new subfolder (it is created
    later, with its parents). Both are probed by creating and removing a temporary
    entry, so read-only mounts and permissions are caught even when running as root.

    Raises:
        TextencError: naming ``option``, the path and the fix.
    """
    text = os.fspath(path)
    shown = show_path(text)
    folder = os.path.abspath(text)
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        where = "" if folder == os.path.abspath(text) else f" (its parent {show_path(folder)} is a file)"
        raise TextencError(f"{option} {shown}: not a folder{where}; give a folder path")
    try:
        probe = tempfile.mkdtemp(dir=folder, prefix=".textenc-", suffix=".probe")
    except OSError as error:
        raise TextencError(f"{option} {shown}: cannot write in folder {show_path(folder)} "
                           f"({error.strerror}); choose a writable location") from None
    os.rmdir(probe)
    return text


def write_file_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, so an
    interrupted or failed write never leaves a partial file under ``path``.

    Raises:
        OSError: with ``path`` as its filename (disk full, permissions, ...).
    """
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".textenc-", suffix=".partial")
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
        temporary = None
    except OSError as error:
        raise OSError(error.errno, error.strerror, target) from None
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
