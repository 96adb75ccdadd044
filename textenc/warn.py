"""Warnings that point at the caller's code, not at textenc's internals.

Python 3.12's ``warnings.warn(skip_file_prefixes=...)`` does this natively;
textenc supports 3.11, so the stack level is counted here: the first frame
whose file is not inside the ``textenc`` package is the one reported.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn_at_caller"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _inside_package(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_PACKAGE_DIR)


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
