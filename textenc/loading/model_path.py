"""Checking a model path before anything is loaded (no torch import, so a command line
can refuse a missing ``--model`` at once)."""

from __future__ import annotations

import os

from ..errors import CheckpointError

__all__ = ["check_model_path", "shown_path"]


def shown_path(path: str) -> str:
    """``path`` as printable text: bytes that are not UTF-8 as ``\\xff`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_model_path(path: str | os.PathLike) -> str:
    """``path`` as a string if it exists and can be opened by name, else a CheckpointError.

    A name holding bytes that are not UTF-8 (possible on Linux) cannot be opened by
    safetensors; it is reported as a path problem, not as a damaged file.
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not os.path.exists(text):
        raise CheckpointError(f"{shown_path(text)}: does not exist; check the path")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{shown_path(text)}: the path is not valid UTF-8 (shown with \\x escapes), "
                              "which safetensors cannot open; rename the file or the folder holding it"
                              ) from None
    return text
