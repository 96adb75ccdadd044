"""Warnings that point at the caller's code, not at textenc's internals.

Python 3.12's ``warnings.warn(skip_file_prefixes=...)`` does this natively;
textenc supports 3.11, so the stack level is counted here: the first frame
whose file is not inside the ``textenc`` package is the one reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import warnings
from typing import Callable, Iterator

from .errors import ConfigError, EmbeddingError, EmbeddingWarning

__all__ = ["warn_at_caller", "ON_MISSING_EMBEDDING", "missing_embedding_policy", "first_of_kind",
           "Tally", "count_of_kind"]

#: What an ``embedding:name`` that cannot be used does: ``warn`` (an EmbeddingWarning, and the
#: prompt goes on) or ``error`` (an EmbeddingError ends the call).
ON_MISSING_EMBEDDING = ("warn", "error")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


_INSIDE: dict[str, bool] = {}  # absolute code file name -> inside the package (asked per warning)
_INSIDE_KEPT = 4096


def _inside_package(filename: str) -> bool:
    inside = _INSIDE.get(filename)
    if inside is None:
        inside = os.path.abspath(filename).startswith(_PACKAGE_DIR)
        if os.path.isabs(filename) and len(_INSIDE) < _INSIDE_KEPT:  # a relative name depends on the cwd
            _INSIDE[filename] = inside
    return inside


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside textenc.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_at_caller("x", UserWarning)
    >>> caught[0].filename.endswith("warn.py")
    False
    """
    frame = sys._getframe(1)
    level = 2  # 1 is this function, 2 its caller
    while frame is not None and _inside_package(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


@contextlib.contextmanager
def missing_embedding_policy(mode: str) -> Iterator[None]:
    """Inside, ``mode="error"`` turns every :class:`~textenc.errors.EmbeddingWarning` (an
    ``embedding:name`` missing from the folder, refused, or given without a folder) into an
    :class:`~textenc.errors.EmbeddingError` naming the option (in Python and on the command
    line); ``"warn"`` changes nothing.

    Warning filters are the process's, so this covers threads started inside (a dataset's
    tokenizer thread) but not other processes.

    >>> with missing_embedding_policy("error"):
    ...     warnings.warn("embedding:x skipped", EmbeddingWarning)
    Traceback (most recent call last):
    textenc.errors.EmbeddingError: embedding:x skipped (an error as asked: on_missing_embedding='error', --on-missing-embedding error)

    Raises:
        ValueError: a mode not in :data:`ON_MISSING_EMBEDDING`.
    """
    if mode not in ON_MISSING_EMBEDDING:
        raise ConfigError(f"on_missing_embedding {mode!r} is not one of {ON_MISSING_EMBEDDING}")
    if mode == "warn":
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingWarning)
        try:
            yield
        except EmbeddingWarning as warning:
            raise EmbeddingError(f"{warning} (an error as asked: on_missing_embedding='error', "
                                 "--on-missing-embedding error)") from None


@dataclasses.dataclass
class Tally:
    """Warnings of one kind counted instead of shown: the ``first`` one's text and how many.

    :func:`count_of_kind` fills one in a process whose warnings nobody sees (a Ray actor);
    the driver hands it to :func:`first_of_kind`'s ``add``, which reports it as its own.
    """

    first: str | None = None
    count: int = 0


@contextlib.contextmanager
def count_of_kind(category: type[Warning], prefix: str) -> Iterator[Tally]:
    """Inside, warnings of ``category`` whose text starts with ``prefix`` are not shown but
    counted in the yielded :class:`Tally` (the others are shown as usual). Warning filters
    are the process's, as for :func:`missing_embedding_policy`.

    >>> with count_of_kind(UserWarning, "lost") as tally:
    ...     for size in (3, 4):
    ...         warnings.warn(f"lost {size}", UserWarning)
    >>> tally
    Tally(first='lost 3', count=2)
    """
    tally = Tally()
    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.filterwarnings("always", message=re.escape(prefix), category=category)

        def count(message, warning_category, *args, **kwargs) -> None:
            if issubclass(warning_category, category) and str(message).startswith(prefix):
                tally.first = str(message) if tally.first is None else tally.first
                tally.count += 1
                return
            shown(message, warning_category, *args, **kwargs)

        warnings.showwarning = count
        yield tally


@contextlib.contextmanager
def first_of_kind(category: type[Warning], prefix: str,
                  summary: Callable[[int], str]) -> Iterator[Callable[[Tally], None]]:
    """Inside, the first warning of ``category`` whose text starts with ``prefix`` is shown
    as usual and the later ones are only counted; on leaving, when there were any, one
    more warning ``summary(count)`` says how many. For a run over many inputs (a
    caption dataset) that would otherwise print one line per input.

    It yields ``add(tally)``, which counts the warnings another process counted
    (:func:`count_of_kind`) as if they were given here: the first one's text is shown
    if it is the first of all.

    Warning filters are the process's, as for :func:`missing_embedding_policy`.

    >>> import sys
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("always")
    ...     warnings.showwarning = lambda message, *rest, **kw: print(message)
    ...     with first_of_kind(UserWarning, "lost", lambda n: f"{n} more lost"):
    ...         for size in (3, 4, 5):
    ...             warnings.warn(f"lost {size}", UserWarning)
    lost 3
    2 more lost
    """
    count = 0
    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.filterwarnings("always", message=re.escape(prefix), category=category)

        def show(message, warning_category, *args, **kwargs) -> None:
            nonlocal count
            if issubclass(warning_category, category) and str(message).startswith(prefix):
                count += 1
                if count > 1:
                    return
            shown(message, warning_category, *args, **kwargs)

        def add(tally: Tally) -> None:
            nonlocal count
            if tally.count:
                warn_at_caller(tally.first or prefix, category)
                count += tally.count - 1

        warnings.showwarning = show
        yield add
    if count > 1:
        warn_at_caller(summary(count - 1), category)

