"""AUTOMATIC1111's attention grammar: ``(x)``, ``[x]``, ``(x:w)``, escapes, ``BREAK``.

The rules (facts from A1111's ``modules/prompt_parser.py``
``parse_prompt_attention``; this is an independent implementation):

* ``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` divides it by 1.1
  (multiplies by ``1 / 1.1``), ``(x:w)`` multiplies it by ``w``. Brackets
  nest, and each closing bracket multiplies everything written since its
  opening bracket, innermost first, so ``((a))`` is ``1.1 * 1.1``.
* ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters; any
  other lone backslash is dropped (the character after it is kept).
* An unclosed ``(`` or ``[`` weights the rest of the prompt (all unclosed
  round brackets first, then the square ones). A stray ``)`` or ``]`` and a
  ``:`` that ends no weight are plain text.
* ``BREAK`` (a whole word, with the white space around it) is a chunk break
  marker of weight -1; inside brackets the marker is multiplied like any
  text, so unless the product is exactly -1 it becomes the word ``BREAK``.
* Neighbouring pieces of exactly equal weight are joined (so
  ``(a)(b)`` is the one string ``"ab"`` at 1.1), and an empty prompt is one
  empty piece of weight 1.
"""

from __future__ import annotations

import math
import re
from itertools import compress, islice
from operator import ne

from ....errors import PromptError

__all__ = ["parse_attention", "read_attention", "is_break", "ROUND", "SQUARE"]

ROUND = 1.1
SQUARE = 1 / 1.1
BREAK_WEIGHT = -1.0
#: Bracket products (pieces x enclosing brackets) a prompt may need. A1111 multiplies
#: every piece inside a bracket once per bracket, which is quadratic for thousands of
#: nested or unclosed brackets; real prompts need far less than this.
MAX_BRACKET_WORK = 20_000_000

# A1111 reads the prompt as items (its re_attention): escapes, a lone backslash, brackets,
# ":weight)", a lone colon, and runs of other text. These are the items other than text,
# plus a bracket holding only text (and, in square brackets, colons: read at once, as the
# items it is made of would be); splitting at them leaves the text runs between.
_SPECIAL = re.compile(r"""(
    \[[^\\()\[\]]*\]
  | \([^\\()\[\]:]*(?:\)|:\s*[+-]?[.\d]+\s*\))
  | \\[()\[\]\\]?
  | [(\[]
  | :\s*[+-]?[.\d]+\s*\)
  | [)\]]+
  | :
)""", re.VERBOSE)
# A1111 splits text at r"\s*\bBREAK\b\s*"; that pattern retried at every character of a
# white space run is quadratic, so the keyword is found alone and the space around it
# is taken by hand (:func:`_split_breaks`).
_BREAK = re.compile(r"\bBREAK\b")
_SPACES = re.compile(r"\s*")
_COLONS = re.compile("(:)")


def is_break(text: str, weight: float) -> bool:
    """Whether the parsed piece ``[text, weight]`` is a chunk break."""
    return text == "BREAK" and weight == BREAK_WEIGHT


def _number(literal: str, text: str) -> float:
    try:
        return float(literal)
    except ValueError:  # A1111 itself stops with a ValueError here
        raise PromptError(f"weight {literal!r} in prompt {text[:80]!r} is not a number; "
                          "write it like (word:1.2)") from None


def _split_breaks(text: str) -> list[str]:
    """``re.split(r"\\s*\\bBREAK\\b\\s*", text)`` in time linear in ``len(text)``."""
    parts, done = [], 0
    for match in _BREAK.finditer(text):
        start = match.start()
        while start > done and text[start - 1].isspace():  # str.isspace is re's \s for str
            start -= 1
        parts.append(text[done:start])
        done = _SPACES.match(text, match.end()).end()
    parts.append(text[done:])
    return parts


class _Pieces:
    """The ``[text, weight]`` pieces read so far, and the text since the last bracket.

    With ``join``, text items in a row (plain text, escapes, stray closing brackets)
    are kept in ``pending`` and become one piece when a bracket or a break comes:
    A1111 makes a piece of each and joins equal neighbours afterwards, and these end
    with equal weights, unless the weight is NaN (NaN equals nothing, so A1111 keeps
    those pieces apart; :func:`parse_attention` then reads the prompt again without
    ``join``).
    """

    def __init__(self, *, join: bool) -> None:
        # two lists, not one [text, weight] list per piece: those would be hundreds of
        # thousands of containers for the garbage collector to walk (half the time)
        self.texts: list[str] = []
        self.weights: list[float] = []
        self.pending: list[str] = []
        self.join = join
        self.budget = MAX_BRACKET_WORK

    def flush(self) -> None:
        if self.pending:
            self.texts.append("".join(self.pending) if len(self.pending) > 1 else self.pending[0])
            self.weights.append(1.0)
            self.pending.clear()

    def add_text(self, text: str) -> None:
        if "BREAK" not in text:  # the common case, without a regex search per item
            self.pending.append(text)
        else:
            for index, part in enumerate(_split_breaks(text)):
                if index:
                    self.flush()
                    self.texts.append("BREAK")
                    self.weights.append(BREAK_WEIGHT)
                self.pending.append(part)
        if not self.join:
            self.flush()

    def open(self) -> int:
        """Where a bracket opened now starts (the index of its first piece)."""
        self.flush()
        return len(self.weights)

    def multiply(self, start: int, factor: float) -> None:
        self.flush()
        weights = self.weights
        self._spend(len(weights) - start)
        for index in range(start, len(weights)):
            weights[index] *= factor

    def group(self, text: str, factor: float) -> None:
        """A bracket holding only ``text``, closed at once: what :meth:`open`, :meth:`add_text`
        and :meth:`multiply` would make of it, without their per-piece work."""
        if "BREAK" in text or not self.join:
            start = self.open()
            for item in _COLONS.split(text):  # A1111's items: text runs and lone colons
                if item:
                    self.add_text(item)
            self.multiply(start, factor)
            return
        self.flush()
        if text:
            self._spend(1)
            self.texts.append(text)
            self.weights.append(1.0 * factor)

    def _spend(self, products: int) -> None:
        self.budget -= products
        if self.budget < 0:
            raise PromptError(f"prompt has too many nested or unclosed brackets (more than "
                              f"{MAX_BRACKET_WORK} bracket products); close or remove some")


def _merge_equal_neighbours(texts: list[str], weights: list[float]) -> tuple[list[str], list[float]]:
    """The pieces with runs of equal weight joined (NaN equals nothing); each run's texts
    are joined once (``+=`` on a list item copies the growing string every time: a
    million stray ``)`` took minutes)."""
    starts = [*compress(range(1, len(weights)), map(ne, islice(weights, 1, None), weights)), len(weights)]
    if len(starts) == len(weights):  # no two neighbours equal
        return texts, weights
    starts.insert(0, 0)
    runs = list(zip(starts, islice(starts, 1, None)))
    return ([texts[a] if b == a + 1 else "".join(texts[a:b]) for a, b in runs], [weights[a] for a, _ in runs])


def read_attention(text: str) -> tuple[list[str], list[float]]:
    """:func:`parse_attention` as two lists, the pieces' texts and their weights: no list
    per piece, whose hundreds of thousands the garbage collector would walk again and
    again (most of the time on ``[a|b]`` x n)."""
    reader = _read(text, join=True)
    if any(map(math.isnan, reader.weights)):  # NaN: A1111's pieces stay apart
        reader = _read(text, join=False)
    if not reader.weights:
        return [""], [1.0]
    return _merge_equal_neighbours(reader.texts, reader.weights)


def parse_attention(text: str) -> list[list]:
    """``text`` as A1111 reads it: a list of ``[text, weight]`` pieces.

    A break is the piece ``["BREAK", -1.0]`` (see :func:`is_break`).

    Raises:
        PromptError: a ``(x:w)`` whose ``w`` is not a number (such as ``1.2.3``), or
            brackets that would take more than :data:`MAX_BRACKET_WORK` products.

    >>> parse_attention("an (important) word")
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    >>> parse_attention("(unnecessary)(parens)")
    [['unnecessaryparens', 1.1]]
    """
    return list(map(list, zip(*read_attention(text))))


def _read(text: str, *, join: bool) -> _Pieces:
    """The pieces of ``text`` before equal neighbours are joined."""
    reader = _Pieces(join=join)
    opened: dict[str, list[int]] = {"(": [], "[": []}
    parts = iter(_SPECIAL.split(text))  # text, item, text, item, ..., text
    first = next(parts)
    if first:
        reader.add_text(first)
    add_text = reader.add_text
    for item, after in zip(parts, parts):
        _read_item(reader, opened, item, text)
        if after:
            add_text(after)
    for start in opened["("]:
        reader.multiply(start, ROUND)
    for start in opened["["]:
        reader.multiply(start, SQUARE)
    reader.flush()
    return reader


def _read_item(reader: _Pieces, opened: dict[str, list[int]], item: str, text: str) -> None:
    """One item of :data:`_SPECIAL` (``text`` is the whole prompt, for error messages)."""
    head = item[0]
    if head in "([":
        if len(item) == 1:
            opened[head].append(reader.open())
        elif head == "[":
            reader.group(item[1:-1], SQUARE)
        elif ":" in item:
            body, _, weight = item[1:-1].partition(":")
            reader.group(body, _number(weight.strip(), text))
        else:
            reader.group(item[1:-1], ROUND)
    elif head == ":" and len(item) > 1 and opened["("]:
        reader.multiply(opened["("].pop(), _number(item[1:-1].strip(), text))
    elif head == "\\":
        reader.add_text(item[1:])  # an escaped character, or "" for a lone backslash
    elif head in ")]":
        _read_closers(reader, opened, item)
    else:
        reader.add_text(item)


def _read_closers(reader: _Pieces, opened: dict[str, list[int]], closers: str) -> None:
    """A run of ``)`` and ``]``: each closes the last bracket of its kind still open, or is
    text; once none is open, the rest of the run is text, read at once (``)`` x n)."""
    for index, char in enumerate(closers):
        waiting = opened["(" if char == ")" else "["]
        if waiting:
            reader.multiply(waiting.pop(), ROUND if char == ")" else SQUARE)
        elif reader.join and not opened["("] and not opened["["]:
            reader.add_text(closers[index:])
            return
        else:
            reader.add_text(char)
