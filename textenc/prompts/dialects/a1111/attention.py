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


def _add_text(pieces: list[list], text: str) -> None:
    for index, part in enumerate(_split_breaks(text)):
        if index:
            pieces.append(["BREAK", BREAK_WEIGHT])
        pieces.append([part, 1.0])


def _multiply(pieces: list[list], start: int, factor: float, budget: list[int]) -> None:
    budget[0] -= len(pieces) - start
    if budget[0] < 0:
        raise PromptError(f"prompt has too many nested or unclosed brackets (more than "
                          f"{MAX_BRACKET_WORK} bracket products); close or remove some")
    for piece in pieces[start:]:
        piece[1] *= factor


def _merge_equal_neighbours(pieces: list[list]) -> list[list]:
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
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
    pieces: list[list] = []
    opened = {"(": [], "[": []}
    budget = [MAX_BRACKET_WORK]
    for match in _ITEM.finditer(text):
        kind = match.lastgroup
        if kind == "escape":
            pieces.append([match.group()[1], 1.0])
        elif kind == "backslash":
            pieces.append(["", 1.0])
        elif kind == "open":
            opened[match.group()].append(len(pieces))
        elif kind == "weight" and opened["("]:
            _multiply(pieces, opened["("].pop(), _number(match.group("weight"), text), budget)
        elif kind == "close" and match.group() == ")" and opened["("]:
            _multiply(pieces, opened["("].pop(), ROUND, budget)
        elif kind == "close" and match.group() == "]" and opened["["]:
            _multiply(pieces, opened["["].pop(), SQUARE, budget)
        else:
            _add_text(pieces, match.group())
    for start in opened["("]:
        _multiply(pieces, start, ROUND, budget)
    for start in opened["["]:
        _multiply(pieces, start, SQUARE, budget)
    return _merge_equal_neighbours(pieces) if pieces else [["", 1.0]]
