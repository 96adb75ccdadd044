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
  follow it directly, as in ``[a:b:5]))``; on lark 1.1.2, which A1111 pins,
  it was observed to pick one reading or the other depending on Python's hash
  seed, i.e. from one start of A1111 to the next; on lark 1.3.1 the choice is
  fixed, ``[a:b:5]))`` being text. textenc always takes the group.) A ``|``
  outside any alternation, or a ``\\`` at the end or before a line break,
  makes the prompt unreadable to the grammar: it is then used as it is,
  for every step.
* The schedule is ``[(end_step, text), ...]``: ``text`` is used at every
  0-based sampling step ``s`` with ``previous end_step < s <= end_step``.
* ``AND`` (a whole word) splits a prompt into parts; a part ending in
  ``:number`` takes that weight (default 1). Each part has its own schedule.
"""

from __future__ import annotations

import math
import re

from ..options import check_steps
from ....errors import PromptError, PromptWarning
from ....warn import warn_at_caller
from .schedule_grammar import MAX_NESTING, Alternate, Scheduled, TooDeep, Unreadable, parse_schedule

__all__ = ["prompt_schedule", "split_and", "Scheduled", "Alternate", "MAX_NESTING", "MAX_SCHEDULE_TEXTS",
           "MAX_SCHEDULE_CHARS"]

_AND = re.compile(r"\bAND\b")
# A1111 reads a part's weight with r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$",
# quadratic on long white space runs; :func:`_part_weight` gives the same groups linearly.
_PART_NUMBER = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")

#: Most texts one schedule may have (one per step at which the prompt changes; an
#: alternation changes it at every step). Each text becomes a conditioning, at least a
#: 77-token window (236 KB for SD1, more for SDXL), so 1,000 bounds a schedule's
#: conditionings to a few hundred MB per window, far above real use (A1111's UI offers
#: at most 150 steps); ``steps=3_000_000`` with ``[a|b]`` would otherwise ask for
#: millions of texts. Refused with a PromptError before any text is made.
MAX_SCHEDULE_TEXTS = 1_000
#: Most characters a schedule's texts may hold together (texts x prompt length; 64 Mi).
MAX_SCHEDULE_CHARS = 1 << 26

def _when(literal: str, steps: int) -> int:
    value = float(literal)
    if "." in literal:
        value *= steps
    if value != value or abs(value) == float("inf"):
        raise PromptError(f"prompt editing step {literal!r} is not a usable number")
    return min(steps, int(value))


def _walk(nodes: list | None, steps: int, found: set[int]) -> bool:
    """Add the steps at which a ``[from:to:when]`` changes the text to ``found``;
    True when an alternation changes it at every step (those are not added)."""
    alternates = False
    for node in nodes or ():
        if isinstance(node, Scheduled):
            node.when = _when(node.when, steps) if isinstance(node.when, str) else node.when
            if node.when >= 1:
                found.add(node.when)
            alternates |= _walk(node.before, steps, found)
            alternates |= _walk(node.after, steps, found)
        elif isinstance(node, Alternate):
            alternates = True
            for option in node.options:
                _walk(option, steps, found)
    return alternates


def _check_size(texts: int, text: str) -> None:
    if texts > MAX_SCHEDULE_TEXTS or texts * len(text) > MAX_SCHEDULE_CHARS:
        raise PromptError(f"prompt schedule needs {texts} texts of up to {len(text)} characters, more than "
                          f"MAX_SCHEDULE_TEXTS={MAX_SCHEDULE_TEXTS} texts or MAX_SCHEDULE_CHARS="
                          f"{MAX_SCHEDULE_CHARS} characters (syntax='a1111'); use fewer steps, prompt edits "
                          "or alternations, or a shorter prompt")


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
        PromptError: ``steps`` is not a positive int, a step number overflows, or the
            schedule would exceed :data:`MAX_SCHEDULE_TEXTS` texts or :data:`MAX_SCHEDULE_CHARS`.

    >>> prompt_schedule("a [b:c:2] d", 4)
    [(2, 'a b d'), (4, 'a c d')]
    """
    check_steps(steps)
    try:
        nodes = parse_schedule(text)
    except Unreadable:
        return [(steps, text)]
    except TooDeep:
        warn_at_caller(f"prompt bracket pairs nest more than {MAX_NESTING} deep: syntax='a1111' reads no "
                       "prompt editing or alternation in it and uses it as written for every step (A1111's "
                       "own parser fails with RecursionError on such prompts)", PromptWarning)
        return [(steps, text)]
    found = {steps}
    if _walk(nodes, steps, found):
        found = range(1, steps + 1)  # counted before it is made
    _check_size(len(found), text)
    return [(step, _render(nodes, step)) for step in sorted(found)]


def _part_weight(part: str) -> tuple[str, str | None]:
    """A1111's weight pattern on one ``AND`` part: ``(body, number or None)``.

    The lazy body stops at the first place the rest is ``\\s*:\\s*NUMBER\\s*`` or only
    white space; a number can only follow the part's last colon (str.strip and
    str.isspace are re's ``\\s`` for str).
    """
    colon = part.rfind(":")
    if colon != -1:
        number = part[colon + 1:].strip()
        if _PART_NUMBER.fullmatch(number):
            return part[:colon].rstrip(), number
    return part.rstrip(), None


def split_and(text: str) -> list[tuple[str, float]]:
    """A1111's ``AND`` parts of ``text`` as ``(part, weight)``.

    >>> split_and("a cat AND a dog:0.5")
    [('a cat', 1.0), (' a dog', 0.5)]
    """
    parts = []
    for part in _AND.split(text):
        body, weight = _part_weight(part)
        value = float(weight) if weight is not None else 1.0
        if not math.isfinite(value):
            raise PromptError(f"AND part weight {weight[:20]}... ({len(weight)} characters) is not a finite "
                              "number")
        parts.append((body, value))
    return parts
