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
                 min_padding: int | None = None, word_ids: bool = True) -> list[list[tuple]]:
    """Windows of ``(token, weight, word_id)`` for the tokenized ``units``, or of
    ``(token, weight)`` with ``word_ids=False`` (the units' own pairs, not copied).

    ``min_padding`` pad tokens are added to the last window, which is then
    padded to ``max_length`` (with ``pad_to_max_length``) and to ``min_length``.
    """
    shape = _Shape(layout, word_ids)
    windows: list[list] = []
    window = shape.new_window(windows)
    empty_length = len(window)
    word_id, pending_break = 0, False
    for unit in units:
        if unit.kind == "break":  # closes the window lazily: a trailing BREAK adds nothing
            pending_break = pending_break or len(window) > empty_length
            continue
        if pending_break:
            shape.close_window(window, layout.max_length - len(window) - shape.has_end)
            window, pending_break = shape.new_window(windows), False
        word_id += 1
        group = unit.tokens
        if len(group) + len(window) <= shape.room:  # most groups: it fits as it is
            window.extend([(t, w, word_id) for t, w in group] if word_ids else group)
        else:
            window = _place(shape, windows, window, group, word_id)
    shape.close_window(window, 0)
    _pad_last(layout, shape.pad, window, min_length, min_padding)
    return windows


class _Shape:
    """A layout's window entries (start, end, pad) as pairs or as triples with word id 0."""

    def __init__(self, layout: WindowLayout, word_ids: bool) -> None:
        def entry(token: Any) -> tuple:
            return (token, 1.0, 0) if word_ids else (token, 1.0)

        self.layout, self.word_ids = layout, word_ids
        self.start = entry(layout.start_token) if layout.start_token is not None else None
        self.end = entry(layout.end_token) if layout.end_token is not None else None
        self.pad = entry(layout.pad_token)
        self.has_end = 1 if self.end is not None else 0
        self.room = layout.max_length - self.has_end  # a window's tokens before its end token

    def new_window(self, windows: list[list]) -> list:
        window = [self.start] if self.start is not None else []
        windows.append(window)
        return window

    def close_window(self, window: list, remaining: int) -> None:
        if self.end is not None:
            window.append(self.end)
        if self.layout.pad_to_max_length:
            window.extend([self.pad] * remaining)


def _place(shape: _Shape, windows: list[list], window: list, group: list, word_id: int) -> list:
    """Add one group's tokens, splitting or moving it; returns the window that is open afterwards."""
    is_large = len(group) >= shape.layout.max_word_length
    position = 0  # an index, not ``group = group[remaining:]``: slicing was quadratic
    while position < len(group):
        if len(group) - position + len(window) > shape.room:
            remaining = shape.room - len(window)
            if is_large:
                window.extend(_entries(group[position:position + remaining], word_id, shape.word_ids))
                position += remaining
                shape.close_window(window, 0)
            else:
                shape.close_window(window, remaining)
            window = shape.new_window(windows)
        else:
            window.extend(_entries(group[position:], word_id, shape.word_ids))
            position = len(group)
    return window


def _entries(pairs: list[tuple], word_id: int, word_ids: bool) -> list[tuple]:
    return [(t, w, word_id) for t, w in pairs] if word_ids else pairs


def _pad_last(layout: WindowLayout, pad: tuple, window: list, min_length: int | None,
              min_padding: int | None) -> None:
    if min_padding is not None:
        window.extend([pad] * min_padding)
    if layout.pad_to_max_length and len(window) < layout.max_length:
        window.extend([pad] * (layout.max_length - len(window)))
    if min_length is not None and len(window) < min_length:
        window.extend([pad] * (min_length - len(window)))
