"""Prompt weight syntax, parsed like ComfyUI but iteratively and safely.

By default :func:`parse_prompt` gives exactly what ComfyUI's
``token_weights(escape_important(text), 1.0)`` gives (``comfy/sd1_clip.py``),
quirks included:

* ``(x)`` multiplies the weight by 1.1, once per nesting level, computed as a
  running product (``((a))`` is ``1.0 * 1.1 * 1.1``).
* ``(x:w)`` *replaces* the outer weight by ``w``. The colon used is the last
  one in the group, wherever it is; if what follows it is not a number the
  colon stays text and the group keeps its 1.1 factor.
* ``\\(`` and ``\\)`` are literal parentheses. Unlike ComfyUI, which swaps
  them for ``"\\0\\1"``/``"\\0\\2"`` sentinels that collide with user text,
  escaped positions are tracked by index, so any user text is safe.
* An unmatched ``(`` stays literal. An unmatched ``)`` at the outer level
  drives ComfyUI's nesting counter negative; every parenthesis is then plain
  text until the counter is back at zero. An unclosed group that happens to
  end with ``)`` (``"(a (b)"``) is still a group, as in ComfyUI.

The parser is an explicit-stack walk over the bracket tables of
:mod:`textenc.prompts.brackets`: no recursion, linear time in the prompt
length. A group whose whole content is one nested group (``((x))``) only
multiplies the weight, so runs of such levels are stepped through in one
tight loop (the same multiplications, in the same order).

Policies (all configurable through :class:`ParseOptions`):

* **Weight literals**, as ComfyUI: whatever Python's ``float()`` accepts is a
  weight (``1.2``, ``1e1``, ``2E-1``, ``1_0``, `` 1.5 ``, Arabic-Indic or
  full-width digits); whatever it rejects stays text. Unlike ComfyUI, a
  weight that is not finite once stored in float32 (``nan``, ``inf``,
  ``1e39``, ``1e999``), or a nesting product that overflows float32, raises
  :class:`~textenc.errors.PromptError` naming the fragment and its
  character position (ComfyUI returns NaN/Inf conditioning).
  ``strict_weights=True`` (opt-in) refuses, with the same error, every
  literal that is not a plain ASCII decimal
  (``^\\s*[+-]?([0-9]+(\\.[0-9]*)?|\\.[0-9]+)\\s*$``).
* **Large weights** are reported, not refused: a segment whose effective
  weight is above ``warn_weight_above`` (default 100.0; None disables) gives
  one :class:`~textenc.errors.PromptWarning` per prompt naming the fragments
  (pointing at the caller's line), and :meth:`SDTokenizer.inspect` lists
  them. ``max_weight`` (default None) refuses them with PromptError instead,
  for hosts that want a hard limit.
* **max_prompt_chars** (default 1,048,576, one MiB of text): longer prompts
  are refused up front with PromptError.

Options beyond ComfyUI (defaults keep ComfyUI's behaviour):

* ``weight_convention="a1111"``: ``(x:w)`` multiplies the outer weight.
* ``square_brackets=True``: ``[x]`` multiplies by ``1 / 1.1`` (no colon
  weights inside square brackets); ``\\[`` and ``\\]`` are literal. Both
  bracket kinds share one nesting counter; a group whose opening and closing
  brackets differ in kind (``(a]``) is plain text.
* ``break_keyword=True``: the word ``BREAK`` (upper case, standing alone)
  becomes a :class:`Segment` with ``is_break=True``, which the tokenizer turns
  into a window boundary.

>>> [(s.text, round(s.weight, 4)) for s in parse_prompt("a (red:1.2) ((fox))")]
[('a ', 1.0), ('red', 1.2), (' ', 1.0), ('fox', 1.21)]
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Iterator

from textenc.errors import PromptError, PromptWarning
from textenc.prompts.brackets import BracketTable, top_level_items
from textenc.warn import warn_at_caller

__all__ = ["Segment", "ParseOptions", "parse_prompt", "iter_segments", "large_weights", "finite_in_float32"]

#: The ``strict_weights=True`` grammar: plain ASCII decimal, optional sign and spaces.
WEIGHT_LITERAL = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_ROUND_FACTOR = 1.1  # ComfyUI: ``weight *= 1.1`` per parenthesis level.
_SQUARE_FACTOR = 1 / 1.1  # A1111: ``square_bracket_multiplier = 1 / 1.1``.
_CONVENTIONS = ("comfy", "a1111")
# Smallest magnitude that rounds to infinity in float32 (max 0x1.fffffep+127 plus half
# an ulp; the tie rounds to even, i.e. up): the encoder multiplies by weights in float32.
_FLOAT32_OVERFLOW = float.fromhex("0x1.ffffffp+127")


def finite_in_float32(value: float) -> bool:
    """Whether ``value`` stays finite when stored as a float32 (``1e39`` does not).

    >>> finite_in_float32(3e38), finite_in_float32(1e39), finite_in_float32(float("nan"))
    (True, False, False)
    """
    return abs(value) < _FLOAT32_OVERFLOW


@dataclass(frozen=True)
class Segment:
    """One weighted piece of a prompt.

    Attributes:
        text: the segment text, escapes already resolved (``\\(`` → ``(``).
        weight: effective weight of every token of the segment.
        start: offset of the first source character in the original prompt.
        end: offset one past the last source character.
        is_break: True for a ``BREAK`` marker (``text`` is ``"BREAK"``).
    """

    text: str
    weight: float
    start: int
    end: int
    is_break: bool = False


@dataclass(frozen=True)
class ParseOptions:
    """Prompt syntax options; the defaults reproduce ComfyUI.

    Raises:
        PromptError: on an unknown convention or a non-positive limit.
    """

    weight_convention: str = "comfy"
    square_brackets: bool = False
    break_keyword: bool = False
    max_weight: float | None = None
    max_prompt_chars: int = 1_048_576
    strict_weights: bool = False
    warn_weight_above: float | None = 100.0

    def __post_init__(self) -> None:
        if self.weight_convention not in _CONVENTIONS:
            raise PromptError(
                f"weight_convention must be one of {_CONVENTIONS}, got {self.weight_convention!r}"
            )
        for name in ("square_brackets", "break_keyword", "strict_weights"):
            if not isinstance(getattr(self, name), bool):
                raise PromptError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("max_weight", "warn_weight_above"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise PromptError(f"{name} must be None or a finite number > 0, got {value!r}")
        if not isinstance(self.max_prompt_chars, int) or self.max_prompt_chars < 0:
            raise PromptError(f"max_prompt_chars must be an int >= 0, got {self.max_prompt_chars!r}")


_PAIR_FACTORS = {"()": _ROUND_FACTOR, "[]": _SQUARE_FACTOR}


def _group_factor(src: BracketTable, lo: int, hi: int) -> float | None:
    """1.1 or 1/1.1 if ``[lo, hi)`` is a bracket group, else None (plain text)."""
    if hi - lo < 2:
        return None
    factor = _PAIR_FACTORS.get(src.text[lo] + src.text[hi - 1])
    if factor is None or src.text[lo] not in src.openers:
        return None  # "(a]" is text; so is "[a]" without square_brackets
    if src.escaped_set and (lo in src.escaped_set or hi - 1 in src.escaped_set):
        return None  # an escaped bracket is text
    return factor


def _colon_weight(src: BracketTable, options: ParseOptions, lo: int, hi: int) -> tuple[float, int] | None:
    """ComfyUI's ``x.rfind(':')`` + ``float(...)`` on the content ``[lo, hi)``.

    Returns ``(value, colon_position)`` or None when the colon part is text.
    Raises PromptError for a value that is not finite in float32, and (with
    ``strict_weights``) for literals float() accepts that are not plain decimals.
    """
    colons = src.colons
    index = bisect.bisect_left(colons, hi) - 1
    if index < 0 or colons[index] <= lo:  # ComfyUI requires ``xx > 0``
        return None
    colon = colons[index]
    if src.has_any(src.brackets, colon + 1, hi) or (src.escaped and src.has_any(src.escaped, colon + 1, hi)):
        return None  # a bracket (escaped or not) is never part of a number
    literal = src.text[colon + 1:hi]
    try:
        value = float(literal)  # ComfyUI: ``float(x[xx+1:])``; what it rejects is text
    except ValueError:
        return None
    if options.strict_weights and not WEIGHT_LITERAL.fullmatch(literal):
        raise PromptError(f"{_weight_at(src, lo, colon, literal)} is not a plain decimal number (strict_weights=True "
                          "refuses exponents, underscores and non-ASCII digits); write e.g. '(word:1.2)'")
    if not abs(value) < _FLOAT32_OVERFLOW:  # finite_in_float32, inline: this runs per weight
        raise PromptError(f"{_weight_at(src, lo, colon, literal)} is not a finite float32 number (it would make "
                          "the conditioning NaN or infinite); write a finite weight, e.g. '(word:1.2)'")
    return value, colon


def _weight_at(src: BracketTable, lo: int, colon: int, literal: str) -> str:
    """``weight '1e99' of 'red fox' at character 9``, for an error message."""
    return f"weight {literal.strip()!r} of {src.text[lo:min(colon, lo + 40)]!r} at character {src.source_offset(colon + 1)}"


class _Emitter:
    """Collects segments, checking weights and splitting on BREAK."""

    def __init__(self, src: BracketTable, options: ParseOptions) -> None:
        self.src = src
        self.options = options
        self.segments: list[Segment] = []
        # Read once: text() runs for every segment. Below _limit a weight passes every check.
        self._limit = _FLOAT32_OVERFLOW if options.max_weight is None else min(options.max_weight, _FLOAT32_OVERFLOW)

    def text(self, lo: int, hi: int, weight: float) -> None:
        if not abs(weight) < self._limit:
            self._check(lo, hi, weight)
        if self.options.break_keyword:
            self._split_breaks(lo, hi, weight)
        else:
            self._append(lo, hi, weight)

    def _check(self, lo: int, hi: int, weight: float) -> None:
        """Refuse a weight that is not finite in float32 or is above ``max_weight``."""
        if not finite_in_float32(weight):
            raise PromptError(f"{self._where(lo, hi, weight)} is not a finite float32 number (too many nested "
                              "parentheses or weights multiplied past 3.4e38); use fewer parentheses or smaller weights")
        limit = self.options.max_weight
        if limit is not None and not abs(weight) <= limit:
            raise PromptError(f"{self._where(lo, hi, weight)} exceeds max_weight={limit}; "
                              "use fewer nested parentheses or a smaller explicit weight")

    def _split_breaks(self, lo: int, hi: int, weight: float) -> None:
        src = self.src
        for match in _BREAK.finditer(src.text, lo, hi):
            if match.start() > lo:
                self._append(lo, match.start(), weight)
            start = src.source_start(match.start())
            self.segments.append(Segment("BREAK", 1.0, start, src.source_offset(match.end() - 1) + 1, True))
            lo = match.end()
        if hi > lo:
            self._append(lo, hi, weight)

    def _where(self, lo: int, hi: int, weight: float) -> str:
        return f"weight {weight!r} of {self.src.text[lo:min(hi, lo + 40)]!r} at character {self.src.source_offset(lo)}"

    def _append(self, lo: int, hi: int, weight: float) -> None:
        src = self.src
        escaped = src.escaped
        if escaped:  # source_start(lo) and source_offset(hi - 1) + 1, inline
            self.segments.append(Segment(src.text[lo:hi], weight, lo + bisect.bisect_left(escaped, lo),
                                         hi + bisect.bisect_left(escaped, hi)))
        else:
            self.segments.append(Segment(src.text[lo:hi], weight, lo, hi))


def _walk_group(src: BracketTable, out: _Emitter, lo: int, hi: int, weight: float) -> None:
    """Emit a group item ``[lo, hi)`` and everything nested in it, depth first."""
    stack: list[list] = []  # frames: [cursor, end, weight]
    _open_group(src, out, stack, lo, hi, weight)
    while stack:
        frame = stack[-1]
        cursor, end, frame_weight = frame
        if cursor >= end:
            stack.pop()
            continue
        opener = src.next_opener(cursor, end)
        if opener > cursor:  # a text run up to the next opener
            out.text(cursor, opener, frame_weight)
            frame[0] = opener
            continue
        close = src.match.get(cursor)
        item_end = close + 1 if close is not None and close < end else end
        frame[0] = item_end
        _open_group(src, out, stack, cursor, item_end, frame_weight)


def _open_group(src: BracketTable, out: _Emitter, stack: list, lo: int, hi: int, weight: float) -> None:
    """Push the content of item ``[lo, hi)`` if it is a group, else emit it as text."""
    factor = _group_factor(src, lo, hi)
    if factor is None:
        out.text(lo, hi, weight)
        return
    if src.match.get(lo + 1) == hi - 2:  # ((x)): its content is one group and nothing else
        lo, hi, weight, factor = _skip_wrappers(src, lo, hi, weight, factor)
    content_end = hi - 1
    inner_weight = weight * factor
    if factor == _ROUND_FACTOR:
        parsed = _colon_weight(src, out.options, lo + 1, content_end)
        if parsed is not None:
            value, content_end = parsed
            inner_weight = value if out.options.weight_convention == "comfy" else weight * value
    if content_end > lo + 1:
        if src.next_opener(lo + 1, content_end) == content_end:  # nothing nested: one text run
            out.text(lo + 1, content_end, inner_weight)  # (what the walk would do with the frame next)
        else:
            stack.append([lo + 1, content_end, inner_weight])


def _skip_wrappers(src: BracketTable, lo: int, hi: int, weight: float,
                   factor: float) -> tuple[int, int, float, float]:
    """Step into ``((x))``-style nesting: while group ``[lo, hi)`` holds exactly one group
    ``[lo + 1, hi - 1)`` and nothing else, that level emits no text and has no colon weight
    (its content ends with a bracket), so it only multiplies the weight by its factor.

    Returns the innermost such group, its outer weight and its factor: what the walk
    would reach one frame at a time, with the same multiplications in the same order.
    """
    match_get, text = src.match.get, src.text
    while match_get(lo + 1) == hi - 2:  # matched brackets are never escaped
        inner = _PAIR_FACTORS.get(text[lo + 1] + text[hi - 2])
        if inner is None:  # "(a]"-style mixed pair: plain text, left to the walk
            break
        weight *= factor
        lo, hi, factor = lo + 1, hi - 1, inner
    return lo, hi, weight, factor


def parse_prompt(
    text: str,
    *,
    weight_convention: str = "comfy",
    square_brackets: bool = False,
    break_keyword: bool = False,
    max_weight: float | None = None,
    max_prompt_chars: int = 1_048_576,
    strict_weights: bool = False,
    warn_weight_above: float | None = 100.0,
    options: ParseOptions | None = None,
) -> list[Segment]:
    """Split a prompt into weighted segments (see the module docstring).

    Args:
        text: the prompt.
        weight_convention, square_brackets, break_keyword, max_weight,
            max_prompt_chars, strict_weights, warn_weight_above: see
            :class:`ParseOptions`; ignored when ``options`` is given.
        options: a prebuilt :class:`ParseOptions`.

    Returns:
        Segments in prompt order; empty text segments are never emitted.

    Raises:
        PromptError: non-str prompt, prompt too long, a weight that is not
            finite in float32, a non-decimal literal with ``strict_weights``,
            or an effective weight above an explicit ``max_weight``.

    Warns:
        PromptWarning: segments weighted above ``warn_weight_above``.

    >>> [(s.text, s.weight) for s in parse_prompt(r"\\(a\\) (b:0.5)")]
    [('(a) ', 1.0), ('b', 0.5)]
    """
    if options is None:
        options = ParseOptions(weight_convention, square_brackets, break_keyword, max_weight, max_prompt_chars,
                               strict_weights, warn_weight_above)
    segments = list(iter_segments(text, options))
    heavy = large_weights(segments, options)
    if heavy:
        warn_at_caller(describe_large_weights(heavy, options), PromptWarning)
    return segments


def iter_segments(text: str, options: ParseOptions) -> Iterator[Segment]:
    """:func:`parse_prompt`'s segments, one top-level group at a time (no large-weight
    warning: the caller reports :func:`large_weights` once it has seen them all), so a
    caller can stop early (the tokenizer's ``max_windows``).

    Raises:
        PromptError: as :func:`parse_prompt`, when the offending segment is reached.
    """
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a str, got {type(text).__name__}")
    if len(text) > options.max_prompt_chars:
        raise PromptError(
            f"prompt has {len(text)} characters, more than max_prompt_chars={options.max_prompt_chars}; "
            "shorten it or raise the limit"
        )
    src = BracketTable(text, square_brackets=options.square_brackets)
    out = _Emitter(src, options)
    cleaned, openers, segments = src.text, src.openers, out.segments
    for lo, hi in top_level_items(src):
        if cleaned[lo] in openers:
            _walk_group(src, out, lo, hi, 1.0)
        else:  # a text item (what _walk_group would find, in one step)
            out.text(lo, hi, 1.0)
        yield from segments
        segments.clear()


def large_weights(segments: list[Segment], options: ParseOptions) -> list[Segment]:
    """The segments weighted above ``options.warn_weight_above`` (none when it is None)."""
    limit = options.warn_weight_above
    return [] if limit is None else [s for s in segments if abs(s.weight) > limit]


def describe_large_weights(heavy: list[Segment], options: ParseOptions) -> str:
    """One line naming the (first five) heavily weighted fragments."""
    shown = ", ".join(f"{s.text[:30]!r} at character {s.start} has weight {s.weight:.4g}" for s in heavy[:5])
    more = f" and {len(heavy) - 5} more" if len(heavy) > 5 else ""
    return (f"prompt weights above {options.warn_weight_above:g}: {shown}{more}; such weights usually "
            "come from unbalanced or deeply nested parentheses or a colon read as a weight "
            "(escape them as \\( \\) if they are text); pass max_weight= to refuse them")
