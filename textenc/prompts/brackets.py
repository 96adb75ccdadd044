"""The bracket tables of one prompt, which :mod:`textenc.prompts.parser` walks.

:class:`BracketTable` removes the escapes (``\\(``, and ``\\[`` with square
brackets) and keeps where they were, then lists the unescaped brackets, each
opener's matching closer and the colons, all as sorted positions in the
cleaned text. :func:`top_level_items` splits the prompt as ComfyUI's
``parse_parentheses`` (``comfy/sd1_clip.py``) splits it, quirks included.

Brackets are found and matched a *run* at a time (consecutive openers, or
consecutive closers): a run is one regex match and one ``range``, so a
100,000-deep ``((...))`` costs a few list operations instead of 200,000
Python steps, and the work stays linear in the prompt length for any input.
"""

from __future__ import annotations

import bisect
import itertools
import re
from typing import Iterator

__all__ = ["BracketTable", "top_level_items"]

# Runs of openers or of closers (square brackets share one nesting counter with round ones).
# The look-ahead is only for speed: it gives the regex engine a character set to skip
# to, which an alternation alone does not (3x faster on prompts of a few brackets).
_RUNS = {False: re.compile(r"(?=[()])(?:\(+|\)+)"), True: re.compile(r"(?=[()\[\]])(?:[(\[]+|[)\]]+)")}
_COLON_RUNS = re.compile(r":+")
# Up to this many brackets or colons, they are found one str.find at a time, faster than a
# regex; past it, a regex finds a run of them in one step (a long run costs one match).
_FEW_BRACKETS = 256
_FEW_COLONS = 64
# An escaped bracket (``\\(``) by bracket set: round only, or round and square.
_ESCAPES = {"()": re.compile(r"\\([()])"), "()[]": re.compile(r"\\([()\[\]])")}


class BracketTable:
    """A prompt with escapes removed, plus the bracket tables the parser walks.

    Attributes:
        openers: the opening brackets, ``"("`` or ``"(["``.
        text: the prompt with ``\\(`` etc. replaced by the bracket alone.
        escaped: sorted positions (in ``text``) of the escaped brackets.
        escaped_set: the same positions as a set.
        runs: the unescaped brackets as ``(start, end)`` runs of one direction (all
            openers or all closers), in order.
        brackets: sorted positions of the unescaped brackets.
        colons: sorted positions of every ``:``.
        match: opener position -> position of the closer that ends its nesting level.

    >>> table = BracketTable(r"a (b\\)) c", square_brackets=False)
    >>> table.text, table.escaped, table.brackets, table.match
    ('a (b)) c', [4], [2, 5], {2: 5})
    """

    def __init__(self, text: str, *, square_brackets: bool) -> None:
        self.bracket_chars = "()[]" if square_brackets else "()"
        self.openers = "([" if square_brackets else "("
        self.text, self.escaped = _unescape(text, self.bracket_chars)
        self.escaped_set = set(self.escaped)
        if sum(map(self.text.count, self.bracket_chars)) > _FEW_BRACKETS:
            runs = [m.span() for m in _RUNS[square_brackets].finditer(self.text)]
            self.runs: list[tuple[int, int]] = _cut_at(runs, self.escaped) if self.escaped else runs
            self.brackets = list(itertools.chain.from_iterable(itertools.starmap(range, self.runs)))
        else:
            self.brackets = _find_all(self.text, self.bracket_chars, self.escaped_set)
            self.runs = _runs_of(self.brackets, self.text, self.openers)
        self.colons = _colons(self.text)
        self.match = _match_runs(self.runs, self.text, self.openers)

    def source_offset(self, pos: int) -> int:
        """Map a cleaned position to its offset in the original prompt."""
        return pos + bisect.bisect_right(self.escaped, pos)

    def source_start(self, pos: int) -> int:
        """Like :meth:`source_offset`, but an escaped bracket starts at its backslash."""
        return pos + bisect.bisect_left(self.escaped, pos)

    @staticmethod
    def has_any(table: list[int], lo: int, hi: int) -> bool:
        """Whether a sorted position table has an entry in ``[lo, hi)``."""
        index = bisect.bisect_left(table, lo)
        return index < len(table) and table[index] < hi

    def next_opener(self, lo: int, hi: int) -> int:
        """First unescaped opener in ``[lo, hi)``, or ``hi``."""
        index = bisect.bisect_left(self.brackets, lo)
        while index < len(self.brackets) and self.brackets[index] < hi:
            pos = self.brackets[index]
            if self.text[pos] in self.openers:
                return pos
            index += 1  # only reached for the outer level's stray closers
        return hi


def _find_all(text: str, chars: str, skip: set[int]) -> list[int]:
    """Sorted positions of every character of ``chars`` in ``text``, less those in ``skip``."""
    positions: list[int] = []
    find = text.find
    for char in chars:
        position = find(char)
        while position >= 0:
            positions.append(position)
            position = find(char, position + 1)
    positions.sort()
    return [p for p in positions if p not in skip] if skip else positions


def _runs_of(brackets: list[int], text: str, openers: str) -> list[tuple[int, int]]:
    """The brackets as ``(start, end)`` runs of adjacent brackets of one direction."""
    runs: list[tuple[int, int]] = []
    run_start, run_end, run_opens = -1, -1, False
    for position in brackets:
        opens = text[position] in openers
        if position != run_end or opens != run_opens:
            if run_end > run_start:
                runs.append((run_start, run_end))
            run_start, run_opens = position, opens
        run_end = position + 1
    if run_end > run_start:
        runs.append((run_start, run_end))
    return runs


def _colons(text: str) -> list[int]:
    """Sorted positions of every ``:`` (a run of them costs one step when there are many)."""
    if text.count(":") > _FEW_COLONS:
        runs = (m.span() for m in _COLON_RUNS.finditer(text))
        return list(itertools.chain.from_iterable(itertools.starmap(range, runs)))
    colons, find = [], text.find
    position = find(":")
    while position >= 0:
        colons.append(position)
        position = find(":", position + 1)
    return colons


def _unescape(text: str, brackets: str) -> tuple[str, list[int]]:
    """``text`` without the backslashes of escaped brackets, and where those brackets now are."""
    if "\\" not in text:  # most prompts: nothing to do
        return text, []
    escape = _ESCAPES[brackets]
    # The i-th escape's bracket lands i places left of its backslash once the backslashes go.
    escaped = [match.start() - i for i, match in enumerate(escape.finditer(text))]
    return escape.sub(r"\1", text), escaped


def _cut_at(runs: list[tuple[int, int]], escaped: list[int]) -> list[tuple[int, int]]:
    """The runs with the escaped positions taken out (an escaped bracket is text)."""
    out: list[tuple[int, int]] = []
    for start, end in runs:
        index = bisect.bisect_left(escaped, start)
        while index < len(escaped) and escaped[index] < end:
            if escaped[index] > start:
                out.append((start, escaped[index]))
            start = escaped[index] + 1
            index += 1
        if end > start:
            out.append((start, end))
    return out


def _match_runs(runs: list[tuple[int, int]], text: str, openers: str) -> dict[int, int]:
    """Stack-match every opener to the closer that ends its nesting level, a run at a time:
    a run of n closers takes the n innermost open openers; stray closers match nothing."""
    stack: list[int] = []
    match: dict[int, int] = {}
    for start, end in runs:
        if text[start] in openers:
            if end - start == 1:  # the common case, kept cheap
                stack.append(start)
            else:
                stack.extend(range(start, end))
        elif end - start == 1:
            if stack:
                match[stack.pop()] = start
        else:
            count = min(end - start, len(stack))
            closed = stack[len(stack) - count:]
            del stack[len(stack) - count:]
            match.update(zip(reversed(closed), range(start, start + count)))
    return match


def top_level_items(table: BracketTable) -> Iterator[tuple[int, int]]:
    """ComfyUI's ``parse_parentheses`` on the whole prompt, as ``(start, end)`` spans, lazily.

    An opener met at nesting level 0 starts an item; the closer that brings the
    level from 1 to 0 ends it. Stray closers drive the level negative, as in
    ComfyUI, and openers then start nothing until it is back at zero.

    >>> list(top_level_items(BracketTable("a (b) ) (c", square_brackets=False)))
    [(0, 2), (2, 5), (5, 10)]
    """
    level = 0
    item_start = 0
    text, openers = table.text, table.openers
    for start, end in table.runs:
        if text[start] in openers:
            if level <= 0 < level + end - start:  # the run's opener met at level 0
                pos = start - level
                if pos > item_start:
                    yield item_start, pos
                item_start = pos
            level += end - start
        else:
            if level >= 1 and level - (end - start) <= 0:  # the run's closer taking level 1 to 0
                pos = start + level - 1
                yield item_start, pos + 1
                item_start = pos + 1
            level -= end - start
    if item_start < len(text):
        yield item_start, len(text)
