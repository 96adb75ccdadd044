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

import re

from ....errors import PromptError

__all__ = ["parse_attention", "is_break", "ROUND", "SQUARE"]

ROUND = 1.1
SQUARE = 1 / 1.1
BREAK_WEIGHT = -1.0
#: Bracket products (pieces x enclosing brackets) a prompt may need. A1111 multiplies
#: every piece inside a bracket once per bracket, which is quadratic for thousands of
#: nested or unclosed brackets; real prompts need far less than this.
MAX_BRACKET_WORK = 20_000_000

# One lexical item per match: escapes, a lone backslash, brackets, ":weight)",
# a run of text, or a lone colon (the order of the alternatives matters).
_ITEM = re.compile(r"""
    (?P<escape>\\[()\[\]\\])
  | (?P<backslash>\\)
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+)
  | (?P<colon>:)
""", re.VERBOSE)
# A1111 splits text at r"\s*\bBREAK\b\s*"; that pattern retried at every character of a
# white space run is quadratic, so the keyword is found alone and the space around it
# is taken by hand (:func:`_split_breaks`).
_BREAK = re.compile(r"\bBREAK\b")
_SPACES = re.compile(r"\s*")


def is_break(piece: list) -> bool:
    """Whether a parsed ``[text, weight]`` piece is a chunk break."""
    return piece[0] == "BREAK" and piece[1] == BREAK_WEIGHT


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
        self.pieces: list[list] = []
        self.pending: list[str] = []
        self.join = join
        self.budget = MAX_BRACKET_WORK

    def flush(self) -> None:
        if self.pending:
            self.pieces.append(["".join(self.pending), 1.0])
            self.pending = []

    def add_text(self, text: str) -> None:
        if "BREAK" not in text:  # the common case, without a regex search per item
            self.pending.append(text)
        else:
            for index, part in enumerate(_split_breaks(text)):
                if index:
                    self.flush()
                    self.pieces.append(["BREAK", BREAK_WEIGHT])
                self.pending.append(part)
        if not self.join:
            self.flush()

    def open(self) -> int:
        """Where a bracket opened now starts (the index of its first piece)."""
        self.flush()
        return len(self.pieces)

    def multiply(self, start: int, factor: float) -> None:
        self.flush()
        self.budget -= len(self.pieces) - start
        if self.budget < 0:
            raise PromptError(f"prompt has too many nested or unclosed brackets (more than "
                              f"{MAX_BRACKET_WORK} bracket products); close or remove some")
        for piece in self.pieces[start:]:
            piece[1] *= factor


def _merge_equal_neighbours(pieces: list[list]) -> list[list]:
    """Join runs of equal weight; each run's texts are joined once (``+=`` on a list
    item copies the growing string every time: a million stray ``)`` took minutes)."""
    merged: list[list] = []
    texts: list[str] = []
    for piece in pieces:
        if merged and piece[1] == merged[-1][1]:
            texts.append(piece[0])
            continue
        if merged:
            merged[-1][0] = "".join(texts)
        merged.append(piece)
        texts = [piece[0]]
    merged[-1][0] = "".join(texts)
    return merged


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
    pieces = _read(text, join=True)
    if any(weight != weight for _, weight in pieces):  # NaN: A1111's pieces stay apart
        pieces = _read(text, join=False)
    return _merge_equal_neighbours(pieces) if pieces else [["", 1.0]]


def _read(text: str, *, join: bool) -> list[list]:
    """The pieces of ``text`` before equal neighbours are joined."""
    reader = _Pieces(join=join)
    opened: dict[str, list[int]] = {"(": [], "[": []}
    for match in _ITEM.finditer(text):
        kind = match.lastgroup
        if kind == "escape":
            reader.add_text(match.group()[1])
        elif kind == "backslash":
            reader.add_text("")
        elif kind == "open":
            opened[match.group()].append(reader.open())
        elif kind == "weight" and opened["("]:
            reader.multiply(opened["("].pop(), _number(match.group("weight"), text))
        elif kind == "close" and match.group() == ")" and opened["("]:
            reader.multiply(opened["("].pop(), ROUND)
        elif kind == "close" and match.group() == "]" and opened["["]:
            reader.multiply(opened["["].pop(), SQUARE)
        else:
            reader.add_text(match.group())
    for start in opened["("]:
        reader.multiply(start, ROUND)
    for start in opened["["]:
        reader.multiply(start, SQUARE)
    reader.flush()
    return reader.pieces
