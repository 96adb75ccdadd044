"""compel's prompt grammar: a prompt string → weighted text fragments.

A hand-written reading of the grammar of compel 2.5.1 (``compel/prompt_parser.py``,
built there with pyparsing), kept to the same results, quirks included. The
recursive-descent reader is :mod:`.compel_parser`; this module flattens its tree
into fragments and reads ``.blend()`` and ``.and()``:

* ``(x)1.3``, ``"x"0.5``, ``x+``, ``x--``, ``(a b)-``, ``x.attend(0.8)``: weights
  multiply through nesting; ``+``/``-`` are 1.1 and 0.9 per sign.
* ``(x)`` alone only groups; ``\\(``, ``\\)``, ``\\"`` are literal brackets and
  quotes; text that does not parse as syntax (``a (b``) stays literal text.
* ``("a", "b").blend(0.7, 0.3)`` (``no_normalize`` last keeps raw weights) and
  ``("a", "b").and()`` / ``.and(w1, w2)`` (``.add`` is the same).
* neighbouring fragments of equal weight are joined with a space, and a space
  is put after every comma followed by a non-space.

Refused with a :class:`~textenc.errors.PromptError` (compel hands them to the
caller; textenc has nothing to apply them with): ``.swap()`` (cross-attention
control) and ``withLora()`` / ``useLora()``. Facts from compel's source; the
code is textenc's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from ....errors import PromptError
from .parser import Attention, Nodes, Parser, unescape

__all__ = ["Fragment", "Member", "Part", "CompelPrompt", "parse_compel"]


@dataclass(frozen=True)
class Fragment:
    """A run of text and its weight (after nesting and joining)."""

    text: str
    weight: float


@dataclass(frozen=True)
class Member:
    """One flattened prompt: its fragments in order (compel's ``FlattenedPrompt``)."""

    fragments: tuple[Fragment, ...]


@dataclass(frozen=True)
class Part:
    """One part of the conjunction: a plain prompt, or a ``.blend()`` of members."""

    members: tuple[Member, ...]
    weight: float = 1.0                        # the conjunction weight (``.and(w, ...)``)
    blend_weights: Optional[tuple[float, ...]] = None  # None: not a blend
    normalize: bool = True


@dataclass(frozen=True)
class CompelPrompt:
    """A parsed compel prompt: conjunction parts, concatenated along tokens."""

    parts: tuple[Part, ...]


# ---- blend and conjunction ------------------------------------------------------

def _weights(options: list[str], operator: str, count: int) -> tuple[tuple[float, ...], bool]:
    normalize = True
    if operator == ".blend" and options and options[-1] == "no_normalize":
        options, normalize = options[:-1], False
    try:
        weights = tuple(float(o) for o in options)
    except ValueError:
        raise PromptError(f"compel {operator}() takes numbers (and, for .blend, a final no_normalize); "
                          f"got {options}") from None
    if weights and len(weights) != count:
        raise PromptError(f"compel {operator}() has {count} prompt(s) but {len(weights)} weight(s)")
    if operator == ".blend" and normalize and weights and sum(weights) == 0:
        raise PromptError(f"compel .blend{tuple(weights)} weights sum to 0 and cannot be normalized "
                          "(compel returns NaN and infinities); add no_normalize or change a weight")
    return weights or (1.0,) * count, normalize


# ---- flattening ----------------------------------------------------------------

def _flatten(nodes: Nodes, scale: float, out: list[tuple[str, float, int]]) -> None:
    """``(text, weight, words)`` per text node, weights multiplied through nesting."""
    for node in nodes:
        if isinstance(node, Attention):
            _flatten(node.children, scale * node.weight, out)
        else:
            out.append((unescape(node.text), 1.0 * scale, node.words))


def _member(nodes: Nodes) -> Optional[Member]:
    """Flatten and join neighbours of equal weight; None when nothing is left."""
    flat: list[tuple[str, float, int]] = []
    _flatten(nodes, 1.0, flat)
    runs: list[list[tuple[str, float, int]]] = []
    for piece in flat:
        if runs and runs[-1][0][1] == piece[1]:
            runs[-1].append(piece)
        else:
            runs.append([piece])
    fused = [Fragment(_fused_text([(text, words) for text, _, words in run]), run[0][1]) for run in runs]
    return Member(tuple(fused)) if fused else None


_ESCAPING = re.compile(r'(?<!\\)(\\+)(?=[()"])')


def _unescaped(text: str, times: int) -> str:
    """``unescape`` applied ``times`` times: each application takes one backslash off
    every run of backslashes before ``(``, ``)`` or ``"``."""
    if not times or "\\" not in text:
        return text
    return _ESCAPING.sub(lambda m: m.group(1)[:max(0, len(m.group(1)) - times)], text)


def _fused_text(run: Sequence[tuple[str, int]]) -> str:
    """The text of a run of ``(text, words)`` pieces of equal weight, ``words`` being
    how many fragments compel sees in a piece (a run of plain words is one piece).

    compel joins the run's fragments one by one, unescaping the whole text at each
    join: ``unescape(unescape(a + " " + b) + " " + c)``. No escape spans the joining
    space, so each fragment is unescaped once per join from its own on (the first as
    the second); computed so, the run is joined once instead of once per fragment.
    A piece of several words holds no escape, so only its count matters.
    """
    count = sum(words for _, words in run)
    texts, index = [], 0
    for text, words in run:
        texts.append(_unescaped(text, count - max(index, 1)))
        index += words
    return " ".join(texts)


def _explicit_conjunction(parser: Parser) -> Optional[CompelPrompt]:
    call = parser.operator_call(0, (".and", ".add"))
    if call is None:
        return None
    targets, operator, options, _end = call  # compel ignores text after .and(...)
    weights, _ = _weights(options, ".and", len(targets))
    parts = [Part((m,), weight=w) for m, w in zip(map(_member, targets), weights) if m is not None]
    return CompelPrompt(tuple(parts))


def _blend(parser: Parser) -> Optional[CompelPrompt]:
    call = parser.operator_call(0, (".blend",))
    if call is None:
        return None
    if parser.ws(call[3]) != parser.n:  # compel's parser fails here too
        parser.refused(call[3])
        raise PromptError(f"compel allows nothing after .blend(...); got {parser.s[call[3]:][:40]!r}")
    targets, operator, options, _end = call
    weights, normalize = _weights(options, ".blend", len(targets))
    members = tuple(m for m in map(_member, targets) if m is not None)
    if len(members) != len(weights):
        raise PromptError(f"compel .blend() has {len(weights)} weight(s) but {len(members)} non-empty prompt(s)")
    return CompelPrompt((Part(members, blend_weights=weights, normalize=normalize),))


def parse_compel(text: str) -> CompelPrompt:
    """Parse ``text`` as compel does.

    Returns:
        The conjunction parts; an empty prompt is one part of one ``("", 1.0)`` fragment.

    Raises:
        PromptError: ``text`` is not a str; ``.swap()`` or a LoRA term; a ``.blend()``
            or ``.and()`` whose weight count does not match its prompts.

    >>> parse_compel("a (red)0.5 cat++").parts[0].members[0].fragments
    (Fragment(text='a', weight=1.0), Fragment(text='red', weight=0.5), Fragment(text='cat', weight=1.2100000000000002))
    """
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a str, got {type(text).__name__}")
    text = re.sub(r",(\S)", r", \1", text)
    empty = CompelPrompt((Part((Member((Fragment("", 1.0),)),)),))
    if not text.strip():
        return empty
    parser = Parser(text.expandtabs())  # pyparsing parses a tab-expanded copy
    parsed = _explicit_conjunction(parser) or _blend(parser)
    if parsed is None:
        nodes, _ = parser.prompt(0)
        member = _member(nodes)
        parsed = CompelPrompt((Part((member,)),)) if member is not None else CompelPrompt(())
    return parsed if parsed.parts else empty
