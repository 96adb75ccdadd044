"""The grammar of A1111's prompt editing and alternation: a prompt as text and
:class:`Scheduled` / :class:`Alternate` nodes (the rules: :mod:`.schedule`).

A bracket construct holding only plain text (``[a|b]``, ``[a:b:5]``, ``(x)``), nearly
every construct of a real prompt, is read by one regular expression (:data:`_SIMPLE`);
others by a recursive descent run without Python recursion (:class:`_Parser`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

__all__ = ["parse_schedule", "Scheduled", "Alternate", "Unreadable", "TooDeep", "MAX_NESTING"]

#: Deepest nesting of closed bracket pairs read for prompt editing. A1111's own parser
#: (lark's recursive tree transformer) fails with RecursionError on balanced nesting a
#: few hundred deep; deeper prompts are used as written, with a PromptWarning.
MAX_NESTING = 500

_NUMBER_TEXT = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER = re.compile(rf"\s*(?P<n>{_NUMBER_TEXT})\s*\]")
# Plain text: anything but ``\[]():|``, and a backslash with the character after it,
# unless that is a line break (a backslash there, or at the end, is outside the grammar).
_PLAIN_TEXT = r"(?:[^\\\[\]():|]|\\.)*"
_PLAIN = re.compile(_PLAIN_TEXT)
# A construct with plain text only inside, as :meth:`_Parser._construct` reads it:
# alternation, [to:when] (tried before [from:to:when]), or a group kept as text.
# A backslash and the character after it (skipped), or a bracket.
_BRACKET = re.compile(r"\\[\s\S]?|[()\[\]]")
_STRAY = re.compile(r"[)\]:]+")
_SIMPLE = re.compile(rf"""
    \[(?P<first>{_PLAIN_TEXT})\|(?P<options>{_PLAIN_TEXT}(?:\|{_PLAIN_TEXT})*)\]
  | \[(?P<to>{_PLAIN_TEXT}):\s*(?P<at>{_NUMBER_TEXT})\s*\]
  | \[(?P<before>{_PLAIN_TEXT}):(?P<after>{_PLAIN_TEXT}):\s*(?P<when>{_NUMBER_TEXT})\s*\]
  | \[{_PLAIN_TEXT}\]
  | \({_PLAIN_TEXT}(?::{_PLAIN_TEXT})?\)
""", re.VERBOSE)

Node = Union[str, "Scheduled", "Alternate"]


@dataclass(slots=True)
class Scheduled:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``."""

    before: Sequence[Node] | None
    after: Sequence[Node]
    when: str


@dataclass(slots=True)
class Alternate:
    """``[a|b|...]``; an empty alternative is None."""

    options: list[Sequence[Node] | None]


class Unreadable(Exception):
    """The prompt is outside the schedule grammar (it is then used as written)."""


def _plain(text: str, i: int) -> int:
    """The end of the plain text starting at ``i`` (``i`` when there is none)."""
    return _PLAIN.match(text, i).end()


def _at(text: str, i: int) -> str:
    return text[i] if i < len(text) else ""


def _closable(text: str, start: int) -> set[int]:
    """Positions from ``start`` on of the ``(`` and ``[`` that a ``)`` or ``]`` of their kind
    closes, pairing brackets as a stack does (escapes skipped as :func:`_plain` skips them).

    Only these can open a construct: inside a construct, complete constructs pair
    their own brackets, so the bracket that ends it pairs with the one that opens it.
    ``start`` must follow top-level text, stray brackets and complete constructs: the
    brackets left open before it pair only with closing brackets that no bracket from
    ``start`` on is waiting for, so the positions found are those a scan of the whole
    prompt finds.
    """
    closable, opened = set(), []
    for match in _BRACKET.finditer(text, start):
        char = match.group()
        if char in "([":
            opened.append(match.start())
        elif char in ")]" and opened:
            opener = opened.pop()
            if text[opener] + char in ("()", "[]"):
                closable.add(opener)
    return closable


class TooDeep(Exception):
    """Bracket constructs nest more than :data:`MAX_NESTING` deep."""


class _Parser:
    """Recursive descent over the schedule grammar, run without Python recursion.

    Each rule is a generator that yields ``("sequence", i)`` or ``("construct", i)``
    to ask for a sub-result and is sent it back; :meth:`_run` keeps the pending rules
    on a list and remembers every result by position, so a prompt is read in time
    about linear in its length, however its brackets nest or fail to close. An opening
    bracket without a closing one of its kind (:func:`_closable`) is not tried.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.closable: set[int] | None = None
        self.simple: dict[str, Node] = {}  # a construct written again is the same node
        self.memo: dict[str, dict[int, tuple | None]] = {"sequence": {}, "construct": {}}

    def _can_open(self, i: int) -> bool:
        """Whether a closing bracket pairs with the bracket at ``i`` (:func:`_closable`, scanned
        from the first position asked about, always a top-level one: :meth:`top_nodes` asks
        before it runs the parser; a prompt of simple constructs never asks)."""
        if self.closable is None:
            self.closable = _closable(self.text, i)
        return i in self.closable

    def _rule(self, kind: str, i: int):
        return self._sequence(i) if kind == "sequence" else self._construct(i)

    def _run(self, kind: str, i: int) -> tuple | None:
        stack = [(kind, i, self._rule(kind, i))]
        value: tuple | None = None
        while stack:
            try:
                want, at = stack[-1][2].send(value)
            except StopIteration as done:
                kind, i, _ = stack.pop()
                value = self.memo[kind][i] = done.value
                continue
            if at in self.memo[want]:
                value = self.memo[want][at]
                continue
            if len(stack) > 2 * MAX_NESTING:  # a sequence and a construct per level
                raise TooDeep
            stack.append((want, at, self._rule(want, at)))
            value = None
        return value

    def _group(self, i: int, end: int, nodes: list) -> tuple[list, int]:
        """A construct's nodes; the source text itself when nothing in it is scheduled."""
        if all(isinstance(node, str) for node in nodes):
            return [self.text[i:end]], end
        return nodes, end

    def _sequence(self, i: int):
        """A run of plain text and complete bracket constructs, up to what ends it."""
        text, nodes = self.text, []
        while i < len(text):
            end = _plain(text, i)
            if end > i:
                nodes.append(text[i:end])
                i = end
                continue
            construct = (yield ("construct", i)) if self._can_open(i) else None
            if construct is None:
                break
            nodes.extend(construct[0])
            i = construct[1]
        return nodes, i

    def _construct(self, i: int):
        """The bracket construct opening at ``i``, or None when none closes there."""
        text = self.text
        inner, j = yield ("sequence", i + 1)
        follow = _at(text, j)
        if text[i] == "(":
            if follow == ")":
                return self._group(i, j + 1, ["(", *inner, ")"])
            if follow == ":":
                weight, k = yield ("sequence", j + 1)
                if _at(text, k) == ")":
                    return self._group(i, k + 1, ["(", *inner, ":", *weight, ")"])
            return None
        if follow == "]":
            return self._group(i, j + 1, ["[", *inner, "]"])
        if follow == "|":
            options = [inner]
            while _at(text, j) == "|":
                option, j = yield ("sequence", j + 1)
                options.append(option or None)
            return ([Alternate(options)], j + 1) if _at(text, j) == "]" else None
        if follow == ":":
            number = _NUMBER.match(text, j + 1)
            if number:
                return [Scheduled(None, inner, number.group("n"))], number.end()
            after, k = yield ("sequence", j + 1)
            number = _NUMBER.match(text, k + 1) if _at(text, k) == ":" else None
            if number:
                return [Scheduled(inner, after, number.group("n"))], number.end()
        return None

    def top_nodes(self) -> list:
        """The prompt's nodes: text (plain, or a stray ``[ ] ( ) :``) and those of complete
        constructs.

        Raises:
            Unreadable: a ``|`` outside alternation or a ``\\`` at the end or before a line break.
            TooDeep: constructs nest more than :data:`MAX_NESTING` deep.
        """
        text, nodes, i = self.text, [], 0
        while i < len(text):
            if text[i] not in "[]():":
                end = _plain(text, i)
                if end == i:
                    raise Unreadable(text[i])
                nodes.append(text[i:end])
                i = end
                continue
            if text[i] in ")]:":  # never opens a construct: stray text, as the run after it
                end = _STRAY.match(text, i).end()
                nodes.append(text[i:end])
                i = end
                continue
            simple = _SIMPLE.match(text, i)
            if simple is not None:  # at the top level only: it nests no deeper than the parser
                source = simple.group()
                node = self.simple.get(source)
                if node is None:
                    node = self.simple[source] = _simple_node(text, simple)
                nodes.append(node)
                i = simple.end()
                continue
            construct = self._run("construct", i) if text[i] in "[(" and self._can_open(i) else None
            if construct is not None:
                nodes += construct[0]
                i = construct[1]
            else:
                nodes.append(text[i])
                i += 1
        return nodes


def _simple_node(text: str, match: re.Match) -> Node:
    """The node of a :data:`_SIMPLE` construct, as :meth:`_Parser._construct` makes it."""
    kind = match.lastgroup
    if kind is None:  # a group kept as text
        return match.group()
    if kind == "at":
        after, when = match.group("to", "at")
        return Scheduled(None, _texts(after), when)
    if kind == "when":
        before, after, when = match.group("before", "after", "when")
        return Scheduled(_texts(before), _texts(after), when)
    options, i = [_texts(match.group("first"))], match.start("options")
    while True:
        end = _plain(text, i)
        options.append(_texts(text[i:end]) or None)
        if text[end] != "|":
            return Alternate(options)
        i = end + 1


def _texts(plain: str) -> tuple[str, ...]:
    # a tuple: the garbage collector stops walking a tuple of strings, never a list
    return (plain,) if plain else ()


def parse_schedule(text: str) -> list:
    """The prompt as text and :class:`Scheduled` / :class:`Alternate` nodes.

    Raises:
        Unreadable: the prompt is outside the grammar.
        TooDeep: its bracket constructs nest more than :data:`MAX_NESTING` deep.
    """
    return _Parser(text).top_nodes()
