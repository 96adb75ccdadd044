"""ComfyUI's packing of a prompt's units into windows of ``max_length`` tokens.

As ``SDTokenizer.tokenize_with_weights`` in ComfyUI's ``comfy/sd1_clip.py``:
every window is ``[start, ..., end, pad...]``; a unit (group) shorter than
``max_word_length`` tokens that does not fit moves whole to the next window,
a longer one is split at the window edge; word ids are the unit's index + 1
(a text piece that tokenized to nothing still uses one). A ``BREAK`` unit
closes the current window unless it is empty (closed lazily, so a trailing
``BREAK`` adds nothing).
"""

from __future__ import annotations

from typing import Any, Protocol

from textenc.prompts.units import Unit

__all__ = ["WindowLayout", "pack_windows"]


class WindowLayout(Protocol):
    """The window shape a tokenizer defines (:class:`~textenc.prompts.vocabulary.Vocabulary` provides it)."""

    max_length: int
    max_word_length: int
    start_token: Any
    end_token: Any
    pad_token: Any
    pad_to_max_length: bool


def pack_windows(units: list[Unit], layout: WindowLayout, *, min_length: int | None = None,
                 min_padding: int | None = None) -> list[list[tuple]]:
    """Windows of ``(token, weight, word_id)`` for the tokenized ``units``.

    ``min_padding`` pad tokens are added to the last window, which is then
    padded to ``max_length`` (with ``pad_to_max_length``) and to ``min_length``.
    """
    windows: list[list] = []
    window = _new_window(layout, windows)
    has_end = 1 if layout.end_token is not None else 0
    empty_length = len(window)
    word_id, pending_break = 0, False
    for unit in units:
        if unit.kind == "break":  # closes the window lazily: a trailing BREAK adds nothing
            pending_break = pending_break or len(window) > empty_length
            continue
        if pending_break:
            _close_window(layout, window, layout.max_length - len(window) - has_end)
            window, pending_break = _new_window(layout, windows), False
        word_id += 1
        window = _place(layout, windows, window, unit.tokens, word_id)
    _close_window(layout, window, 0)
    _pad_last(layout, window, min_length, min_padding)
    return windows


def _place(layout: WindowLayout, windows: list[list], window: list, group: list, word_id: int) -> list:
    """Add one group's tokens; returns the window that is open afterwards."""
    has_end = 1 if layout.end_token is not None else 0
    if len(group) + len(window) <= layout.max_length - has_end:  # most groups: it fits as it is
        window.extend([(t, w, word_id) for t, w in group])
        return window
    is_large = len(group) >= layout.max_word_length
    position = 0  # an index, not ``group = group[remaining:]``: slicing was quadratic
    while position < len(group):
        if len(group) - position + len(window) > layout.max_length - has_end:
            remaining = layout.max_length - len(window) - has_end
            if is_large:
                window.extend((t, w, word_id) for t, w in group[position:position + remaining])
                position += remaining
                _close_window(layout, window, 0)
            else:
                _close_window(layout, window, remaining)
            window = _new_window(layout, windows)
        else:
            window.extend((t, w, word_id) for t, w in group[position:])
            position = len(group)
    return window


def _new_window(layout: WindowLayout, windows: list[list]) -> list:
    window = [(layout.start_token, 1.0, 0)] if layout.start_token is not None else []
    windows.append(window)
    return window


def _close_window(layout: WindowLayout, window: list, remaining: int) -> None:
    if layout.end_token is not None:
        window.append((layout.end_token, 1.0, 0))
    if layout.pad_to_max_length:
        window.extend([(layout.pad_token, 1.0, 0)] * remaining)


def _pad_last(layout: WindowLayout, window: list, min_length: int | None, min_padding: int | None) -> None:
    pad = (layout.pad_token, 1.0, 0)
    if min_padding is not None:
        window.extend([pad] * min_padding)
    if layout.pad_to_max_length and len(window) < layout.max_length:
        window.extend([pad] * (layout.max_length - len(window)))
    if min_length is not None and len(window) < min_length:
        window.extend([pad] * (min_length - len(window)))
