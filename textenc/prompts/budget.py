"""Prompt length limit: count tokens while tokenizing and refuse as soon as they cannot fit.

Kept apart from :mod:`textenc.prompts.tokenizer` so the tokenizer stays one concern.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

from textenc.errors import PromptError

__all__ = ["TokenBudget", "check_max_windows", "space_chunks"]

_DIGIT_THEN_ASCII = re.compile(r"[0-9](?=[\x00-\x7f])")


def check_max_windows(value: Any) -> int | None:
    """``value`` if it is None or an int >= 1, else PromptError."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise PromptError(f"max_windows must be None or an int >= 1, got {value!r}")


def space_chunks(text: str, size: int) -> Iterator[str]:
    """Consecutive pieces of about ``size`` characters, each cut just after a space or, in a
    window without one, just after an ASCII digit followed by an ASCII character (a word with
    neither stays whole).

    Both cuts leave CLIP's tokens as they are: its normaliser and split regex never join
    text across a space, a digit is always a piece of its own, and an ASCII character is
    never composed (NFC) with what precedes it. So a long prompt without spaces
    (``"[a1:b:1][a2:b:2]..."``) is still tokenized, and refused, a piece at a time.
    """
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            cut = text.rfind(" ", start, end)
            if cut < start:
                cut = _last_digit_cut(text, start, end)
            if cut < start:
                cut = text.find(" ", end)
            end = len(text) if cut < 0 else cut + 1
        yield text[start:end]
        start = end


def _last_digit_cut(text: str, start: int, end: int) -> int:
    """The last ASCII digit in ``text[start:end]`` followed by an ASCII character there, or -1."""
    cut = -1
    for match in _DIGIT_THEN_ASCII.finditer(text, start, end):
        cut = match.start()
    return cut


class TokenBudget:
    """Counts a prompt's tokens while it is tokenized and refuses once they cannot fit.

    ``max_windows`` windows hold at most ``max_windows * capacity`` tokens, so
    passing that count proves the limit is exceeded, whatever the packing.
    """

    def __init__(self, tokenizer: Any, max_windows: int | None, prompt_chars: int) -> None:
        self.capacity = tokenizer.window_capacity()
        self.max_windows = max_windows
        self.limit = None if max_windows is None else max_windows * self.capacity
        self.prompt_chars = prompt_chars
        self.tokens = self.chars = 0

    def add_many(self, counts: list[tuple[int, int]]) -> None:
        """:meth:`add` for each ``(tokens, chars)`` in turn (one check when all of them fit)."""
        tokens = sum(t for t, _ in counts)
        if self.limit is None or self.tokens + tokens <= self.limit:
            self.tokens += tokens
            self.chars += sum(c for _, c in counts)
            return
        for tokens, chars in counts:  # refused on the way: the same message as one add at a time
            self.add(tokens, chars)

    def add(self, tokens: int, chars: int) -> None:
        self.tokens += tokens
        self.chars += chars
        if self.limit is None or self.tokens <= self.limit:
            return
        share = max(self.chars, 1) / max(self.prompt_chars, 1)
        estimate = int(self.tokens / min(share, 1.0) / self.capacity) + 1
        raise PromptError(
            f"prompt needs more than max_windows={self.max_windows} windows of {self.capacity} tokens "
            f"({self.tokens} tokens in its first {self.chars} of {self.prompt_chars} characters; about "
            f"{estimate} windows in all); shorten it, or pass max_windows=None (or a larger number) "
            "to the tokenizer or to this call")
