"""AUTOMATIC1111's prompt editing, alternation and ``AND``.

The rules (facts from A1111's ``modules/prompt_parser.py``: its schedule
grammar, ``get_learned_conditioning_prompt_schedules`` and
``get_multicond_prompt_list``; this is an independent implementation):

* ``[from:to:when]`` is ``from`` up to step ``when`` and ``to`` after it;
  ``[to:when]`` adds ``to`` after ``when``; ``[from::when]`` removes ``from``
  after ``when``. ``when`` with a ``.`` is a fraction of the steps
  (``int(when * steps)``), without one a step count; both are capped at
  ``steps``. ``[a|b|c]`` takes ``a``, ``b``, ``c``, ``a``... one per step
  (an empty alternative is empty text). They nest, and inside them ``(x)``,
  ``(x:w)`` and ``[x]`` are kept as text for the attention grammar.
* Outside such brackets, unbalanced ``[ ] ( ) :`` are plain text. A bracket
  group that closes is always read as a group. (A1111's grammar also allows
  reading a top-level group as stray brackets when stray ``[ ] ( ) :``
  follow it directly, as in ``[a:b:5]))``; A1111 was observed to pick one
  reading or the other depending on Python's hash seed, i.e. from one start
  of A1111 to the next. textenc always takes the group.) A ``|``
  outside any alternation, or a ``\\`` at the end or before a line break,
  makes the prompt unreadable to the grammar: it is then used as it is,
  for every step.
* The schedule is ``[(end_step, text), ...]``: ``text`` is used at every
  0-based sampling step ``s`` with ``previous end_step < s <= end_step``.
* ``AND`` (a whole word) splits a prompt into parts; a part ending in
  ``:number`` takes that weight (default 1). Each part has its own schedule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from ...errors import PromptError

__all__ = ["prompt_schedule", "split_and", "Scheduled", "Alternate"]

_NUMBER = re.compile(r"\s*(?P<n>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
_SPECIAL = "\\[]():|"

Node = Union[str, "Scheduled", "Alternate"]


@dataclass
class Scheduled:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``."""

    before: list | None
    after: list
    when: str


@dataclass
class Alternate:
    """``[a|b|...]``; an empty alternative is None."""

    options: list


class _Unreadable(Exception):
    """The prompt is outside the schedule grammar (it is then used as written)."""


def _plain(text: str, i: int) -> int:
    """The end of the plain text starting at ``i`` (``i`` when there is none)."""
    while i < len(text):
        char = text[i]
        if char == "\\":
            if i + 1 >= len(text) or text[i + 1] == "\n":
                return i
            i += 2
        elif char in _SPECIAL:
            return i
        else:
            i += 1
    return i


def _sequence(text: str, i: int) -> tuple[list, int]:
    """A run of plain text and complete bracket constructs, up to what ends it."""
    nodes: list = []
    while i < len(text):
        end = _plain(text, i)
        if end > i:
            nodes.append(text[i:end])
            i = end
            continue
        construct = _construct(text, i) if text[i] in "([" else None
        if construct is None:
            break
        nodes.extend(construct[0])
        i = construct[1]
    return nodes, i


def _at(text: str, i: int) -> str:
    return text[i] if i < len(text) else ""


def _round(text: str, i: int) -> tuple[list, int] | None:
    inner, j = _sequence(text, i + 1)
    if _at(text, j) == ")":
        return ["(", *inner, ")"], j + 1
    if _at(text, j) == ":":
        weight, k = _sequence(text, j + 1)
        if _at(text, k) == ")":
            return ["(", *inner, ":", *weight, ")"], k + 1
    return None


def _alternate(text: str, first: list, j: int) -> tuple[list, int] | None:
    options = [first]
    while _at(text, j) == "|":
        option, j = _sequence(text, j + 1)
        options.append(option or None)
    return ([Alternate(options)], j + 1) if _at(text, j) == "]" else None


def _scheduled(text: str, first: list, j: int) -> tuple[list, int] | None:
    number = _NUMBER.match(text, j + 1)
    if number:
        return [Scheduled(None, first, number.group("n"))], number.end()
    after, k = _sequence(text, j + 1)
    number = _NUMBER.match(text, k + 1) if _at(text, k) == ":" else None
    if number:
        return [Scheduled(first, after, number.group("n"))], number.end()
    return None


def _construct(text: str, i: int) -> tuple[list, int] | None:
    """The bracket construct opening at ``i``, or None when none closes there."""
    if text[i] == "(":
        return _round(text, i)
    inner, j = _sequence(text, i + 1)
    follow = _at(text, j)
    if follow == "]":
        return ["[", *inner, "]"], j + 1
    if follow == "|":
        return _alternate(text, inner, j)
    if follow == ":":
        return _scheduled(text, inner, j)
    return None


@dataclass
class _Group:
    """A complete bracket construct at the top level, and its source text."""

    nodes: list
    text: str


def _top_items(text: str) -> list:
    """Top-level items: text (plain, or a stray ``[ ] ( ) :``) and complete groups.

    Raises:
        _Unreadable: a ``|`` outside alternation or a ``\\`` at the end or before a line break.
    """
    items: list = []
    i = 0
    while i < len(text):
        construct = _construct(text, i) if text[i] in "([" else None
        if construct is not None:
            items.append(_Group(construct[0], text[i:construct[1]]))
            i = construct[1]
        elif text[i] in "[]():":
            items.append(text[i])
            i += 1
        else:
            end = _plain(text, i)
            if end == i:
                raise _Unreadable(text[i])
            items.append(text[i:end])
            i = end
    return items


def parse_schedule(text: str) -> list:
    """The prompt as text and :class:`Scheduled` / :class:`Alternate` nodes.

    Raises:
        _Unreadable: the prompt is outside the grammar.
    """
    nodes: list = []
    for item in _top_items(text):
        nodes.extend(item.nodes if isinstance(item, _Group) else [item])
    return nodes


def _when(literal: str, steps: int) -> int:
    value = float(literal)
    if "." in literal:
        value *= steps
    if value != value or abs(value) == float("inf"):
        raise PromptError(f"prompt editing step {literal!r} is not a usable number")
    return min(steps, int(value))


def _walk(nodes: list | None, steps: int, found: set[int]) -> None:
    for node in nodes or ():
        if isinstance(node, Scheduled):
            node.when = _when(node.when, steps) if isinstance(node.when, str) else node.when
            if node.when >= 1:
                found.add(node.when)
            _walk(node.before, steps, found)
            _walk(node.after, steps, found)
        elif isinstance(node, Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _walk(option, steps, found)


def _render(nodes: list | None, step: int) -> str:
    out = []
    for node in nodes or ():
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Scheduled):
            out.append(_render(node.before if step <= node.when else node.after, step))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """``[(end_step, text), ...]`` for ``steps`` sampling steps (A1111's prompt schedule).

    Raises:
        PromptError: ``steps`` is not a positive int, or a step number overflows.

    >>> prompt_schedule("a [b:c:2] d", 4)
    [(2, 'a b d'), (4, 'a c d')]
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PromptError(f"steps must be a positive int, got {steps!r}")
    try:
        nodes = parse_schedule(text)
    except _Unreadable:
        return [(steps, text)]
    found = {steps}
    _walk(nodes, steps, found)
    return [(step, _render(nodes, step)) for step in sorted(found)]


def split_and(text: str) -> list[tuple[str, float]]:
    """A1111's ``AND`` parts of ``text`` as ``(part, weight)``.

    >>> split_and("a cat AND a dog:0.5")
    [('a cat', 1.0), (' a dog', 0.5)]
    """
    parts = []
    for part in _AND.split(text):
        match = _PART_WEIGHT.search(part)
        body, weight = match.groups() if match else (part, None)
        parts.append((body, float(weight) if weight is not None else 1.0))
    return parts
