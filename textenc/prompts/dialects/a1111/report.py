"""``A1111InspectReport``: an :class:`~textenc.prompts.report.InspectReport` with A1111's chunks."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...report import InspectReport

__all__ = ["A1111InspectReport"]


@dataclass(frozen=True)
class A1111InspectReport(InspectReport):
    """``windows``/``units``/``embeddings`` as for ComfyUI, plus ``chunks`` (one
    ``ChunkReport`` per window: prompt tokens and what ended it) and ``moves``
    (``MoveReport``: the text comma backtracking moved to the next chunk).
    Units are A1111's weighted pieces, each with the word id its tokens carry in
    ``windows`` and the number of prompt tokens it made (an embedding's vectors
    included); a ``BREAK`` is a "break" unit of word 0, weight 1 and no tokens, as
    ComfyUI's. Their ``start``/``end`` are -1 (A1111 joins pieces, so they have no
    single place in the prompt)."""

    chunks: list = field(default_factory=list)
    moves: list = field(default_factory=list)
