"""``textenc inspect`` on a long prompt: counts, the first and the last window and the
first and last units, instead of every token (``--full`` prints everything).

A 5,000-word prompt is 60+ windows; printing every token of each (and the whole
text of each unit on one line) gave 248 KB. A prompt is *long* when it has more
than :data:`SHOWN_WINDOWS` windows, more than ``2 * SHOWN_UNITS`` units or a unit
text longer than :data:`LONG_TEXT` characters (compel keeps one window, but its
one unit holds the whole text); its table then starts with a ``summary:`` line of
counts and says what it left out.
``--json`` is for programs and always holds everything.

Kept apart from :mod:`textenc.commands.inspect` so the table's own code stays as
it is; the window printer is passed in (``window_lines``), so no import runs back.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..prompts.report import InspectReport, TokenReport, UnitReport

__all__ = ["FULL_HELP", "SHOWN_WINDOWS", "SHOWN_UNITS", "SHOWN_CHARS", "LONG_TEXT", "is_long", "dropped_lines",
           "embedding_lines", "format_summary"]

#: Windows a summary shows: the first and the last.
SHOWN_WINDOWS = 2
#: Units a summary shows at each end.
SHOWN_UNITS = 10
#: Characters of a unit's text a summary shows.
SHOWN_CHARS = 60
#: A unit text longer than this makes a prompt long.
LONG_TEXT = 200

FULL_HELP = (f"print every window, token and unit of a long prompt (default: a prompt of more than "
             f"{SHOWN_WINDOWS} windows or {2 * SHOWN_UNITS} units, or with a unit text of over {LONG_TEXT} "
             f"characters, is summarised: counts, the first and the last window, the first and last "
             f"{SHOWN_UNITS} units with their text cut to {SHOWN_CHARS} "
             "characters; --json always prints everything)")

WindowLines = Callable[[int, Sequence[TokenReport]], list[str]]


def is_long(report: InspectReport) -> bool:
    """Whether ``report`` (an ``InspectReport``) is summarised unless ``--full`` is given."""
    return (len(report.windows) > SHOWN_WINDOWS or len(report.units) > 2 * SHOWN_UNITS
            or any(len(unit.text) > LONG_TEXT for unit in report.units))


def dropped_lines(report: InspectReport) -> list[str]:
    """The ``truncated:`` line when the dialect left prompt tokens out (compel's default)."""
    dropped = report.dropped_tokens
    if not dropped:
        return []
    kept = sum(1 for window in report.windows for token in window if token.word_id != 0)
    first = report.windows[0]
    limit = len(first) - 1 - (first[0].word_id == 0)  # the end token, and the start token where there is one (not T5)
    counted = "" if report.dropped_tokens_exact else "at least "  # counted up to max_windows only
    if report.truncation_fixed:  # the option is refused here (compel on Flux's T5)
        return [f"truncated: {counted}{dropped} prompt token(s) dropped, {kept} kept (compel keeps the first {limit} "
                f"of each prompt; {report.truncation_fixed})"]
    return [f"truncated: {counted}{dropped} prompt token(s) dropped, {kept} kept (compel's truncate_long_prompts=True, "
            f"the default, keeps the first {limit} of each prompt); --no-truncate-long-prompts keeps them all"]


def _unit_line(unit: UnitReport) -> str:
    text = repr(unit.text[:SHOWN_CHARS])
    if len(unit.text) > SHOWN_CHARS:
        text += f" ... ({len(unit.text)} characters)"
    return (f"  word {unit.word_id:>3}  {unit.kind:<9}  weight {unit.weight:<7.4g}  "
            f"{unit.num_tokens:>3} token(s)  {text}")


def _counts(report: InspectReport) -> str:
    tokens = sum(1 for window in report.windows for token in window if token.word_id != 0)
    chunks = getattr(report, "chunks", ())
    extra = f", {len(chunks)} chunk(s)" if chunks else ""
    return (f"summary: {len(report.windows)} window(s), {tokens} prompt token(s), {len(report.units)} "
            f"unit(s){extra}; a summary (--full prints every one)")


def _unit_lines(units: Sequence[UnitReport]) -> list[str]:
    if len(units) <= 2 * SHOWN_UNITS:
        return ["units:", *map(_unit_line, units)]
    hidden = len(units) - 2 * SHOWN_UNITS
    return ["units:", *map(_unit_line, units[:SHOWN_UNITS]), f"  ... {hidden} unit(s) not shown",
            *map(_unit_line, units[-SHOWN_UNITS:])]


def format_summary(report: InspectReport, window_lines: WindowLines) -> str:
    """A long ``InspectReport`` as ``textenc inspect`` prints it without ``--full``.

    ``window_lines(index, window)`` prints one window as the full table does.
    """
    lines = [_counts(report)]
    windows = report.windows
    lines += window_lines(0, windows[0])
    if len(windows) > 2:
        lines.append(f"... windows 1..{len(windows) - 2} not shown")
    if len(windows) > 1:
        lines += window_lines(len(windows) - 1, windows[-1])
    lines += _unit_lines(report.units)
    moves = getattr(report, "moves", ())
    if moves:
        lines.append(f"comma backtracking moved tokens {len(moves)} time(s)")
    lines += dropped_lines(report)
    lines += embedding_lines(report)
    return "\n".join(lines)


def embedding_lines(report: InspectReport) -> list[str]:
    """The ``embeddings:`` section (each ``embedding:name``: found with its path, or why not)."""
    if not report.embeddings:
        return []
    lines = ["embeddings:"]
    for entry in report.embeddings:
        detail = entry.path if entry.status == "found" else entry.reason
        lines.append(f"  {entry.name}: {entry.status} ({detail})")
    return lines
