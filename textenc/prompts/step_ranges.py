"""Which sampling steps each text of a prompt schedule covers.

A prompt schedule (:func:`textenc.prompts.dialects.prompt_schedules`) is
``[(end_step, text), ...]``: as in AUTOMATIC1111, ``text`` is used at every
0-based sampling step ``s`` with ``previous end_step < s <= end_step``. ComfyUI
conditioning says the same with fractions of the run: an entry is active while
``start_percent <= s / steps < end_percent``. This module turns one into the
other, once, for :meth:`textenc.sd.CLIP.encode_scheduled` (the conditioning)
and ``textenc inspect --steps`` (what it prints), so both say the same. It
imports no torch.

>>> [(r.first_step, r.last_step, r.start_percent, r.end_percent, r.text)
...  for r in step_ranges([(2, "a b"), (4, "a c")], 4)]
[(0, 2, 0.0, 0.75, 'a b'), (3, 3, 0.75, 1.0, 'a c')]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["StepRange", "step_ranges"]


@dataclass(frozen=True)
class StepRange:
    """The steps one text of a schedule is used at.

    Attributes:
        index: position of the text in the schedule.
        first_step, last_step: 0-based sampling steps, both included.
        start_percent, end_percent: the same range as ComfyUI conditioning
            has it (``start_percent <= step / steps < end_percent``).
        text: the prompt text used over the range.
    """

    index: int
    first_step: int
    last_step: int
    start_percent: float
    end_percent: float
    text: str


def step_ranges(schedule: Sequence[tuple[int, str]], steps: int) -> list[StepRange]:
    """The step range of each text of ``schedule`` that is used in ``steps`` steps.

    Text ``k`` covers steps ``end[k-1] + 1 .. end[k]`` (the first from step 0),
    cut at the last step ``steps - 1``; a text that would start after the last
    step is never used and is left out.
    """
    ranges, previous = [], -1
    for index, (end, text) in enumerate(schedule):
        first = previous + 1
        start, stop = first / steps, min(1.0, (end + 1) / steps)
        previous = end
        if start < 1.0:
            ranges.append(StepRange(index, first, min(end, steps - 1), start, stop, text))
    return ranges
