"""A prompt's segments cut into units: text pieces, embeddings and ``BREAK`` marks.

This is ComfyUI's ``tokenize_with_weights`` step between parsing and
tokenizing (``comfy/sd1_clip.py``): each weighted segment is split before
``" embedding:"``/``"\\nembedding:"`` (the separator is dropped), and every
piece becomes one :class:`Unit` (one *group*: text tokenized at once, or the
vectors of one embedding, which may have none). The embedding name is the first
word after the colon (whitespace before it is skipped, as ComfyUI's
``split()[0]``); a name not found is tried again with commas stripped from
both ends, and the stripped commas stay in the prompt as text (see :mod:`textenc.prompts.dialects.comfy`
for how this differs from ComfyUI). Missing and refused embeddings, and
``embedding:NAME`` without an embedding directory, give an
:class:`~textenc.errors.EmbeddingWarning` and the prompt goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from textenc.errors import EmbeddingWarning
from textenc.loading.embeddings import NO_DIRECTORY, EmbeddingLoader, EmbeddingResult
from textenc.prompts.parser import Segment
from textenc.warn import warn_at_caller

__all__ = ["EMBEDDING_IDENTIFIER", "Unit", "split_units"]

EMBEDDING_IDENTIFIER = "embedding:"
_PIECE_SPLIT = re.compile(" embedding:|\nembedding:")  # ComfyUI's split, separator dropped
_NAME_END = re.compile(r"\s")


@dataclass
class Unit:
    """One group of a prompt.

    Attributes:
        kind: ``"text"``, ``"embedding"`` or ``"break"``.
        text: the piece's text (the embedding's name for an embedding).
        weight: the segment's weight.
        segment: the parsed segment the unit comes from.
        tokens: ``(token, weight)`` pairs; filled for embeddings here and for
            text by the tokenizer (a token is an id or one embedding vector).
    """

    kind: str
    text: str
    weight: float
    segment: Segment
    tokens: list = field(default_factory=list)


def split_units(segments: list[Segment], embeddings: EmbeddingLoader | None,
                found: list[EmbeddingResult]) -> list[Unit]:
    """Cut ``segments`` into units, looking embeddings up in ``embeddings`` (None: no
    embedding directory) and appending every lookup's result to ``found``.

    Warns:
        EmbeddingWarning: an embedding is missing or refused, or there is no directory.
    """
    units: list[Unit] = []
    state: list[tuple] = []  # the embedding folders' state, taken at the first embedding:name
    for segment in segments:
        if segment.is_break:
            units.append(Unit("break", "BREAK", 1.0, segment))
            continue
        if EMBEDDING_IDENTIFIER not in segment.text:  # most segments: one text piece (or none)
            if segment.text:
                units.append(Unit("text", segment.text, segment.weight, segment))
            continue
        split = _PIECE_SPLIT.split(segment.text)
        pieces = [split[0]] + [EMBEDDING_IDENTIFIER + p for p in split[1:]]
        for piece in (p for p in pieces if p):
            if piece.startswith(EMBEDDING_IDENTIFIER):
                units.extend(_embedding_units(piece, segment, embeddings, found, state))
            else:
                units.append(Unit("text", piece, segment.weight, segment))
    return units


def _embedding_units(piece: str, segment: Segment, embeddings: EmbeddingLoader | None,
                     found: list[EmbeddingResult], state: list[tuple]) -> list[Unit]:
    """An ``embedding:name rest`` piece: the embedding group, then the rest as text.
    ``state`` holds the folders' state once the first lookup has taken it."""
    rest = piece[len(EMBEDDING_IDENTIFIER):].lstrip()  # ComfyUI's name is rest.split()[0]
    end = _NAME_END.search(rest)
    name, leftover = (rest[:end.start()], rest[end.start():]) if end else (rest, "")
    if not name:  # ComfyUI raises IndexError here; the piece stays text
        return [Unit("text", piece, segment.weight, segment)]
    if embeddings is None:  # ComfyUI reads it as text; say why
        warn_at_caller(f"embedding:{name} read as text: {NO_DIRECTORY} (pass embedding_directory= "
                       "to the tokenizer, or --embeddings on the command line)", EmbeddingWarning)
        return [Unit("text", piece, segment.weight, segment)]
    leading = ""
    if not state:
        state.append(embeddings.folder_state())
    result = embeddings.lookup(name, folder_state=state[0])
    stripped = name.strip(",")  # ComfyUI strips commas at both ends, then tries again
    if result.status != "found" and stripped and stripped != name:
        leading = name[:len(name) - len(name.lstrip(","))]
        leftover = name[len(leading) + len(stripped):] + leftover  # the commas stay as text
        result = embeddings.lookup(stripped, folder_state=state[0])
    found.append(result)
    units = [Unit("text", leading, segment.weight, segment)] if leading else []
    if result.status == "found":
        rows = result.vectors
        units.append(Unit("embedding", result.name, segment.weight, segment,
                          [(rows[i], segment.weight) for i in range(rows.shape[0])]))
    else:
        warn_at_caller(f"embedding:{result.name} skipped ({result.status}: {result.reason})", EmbeddingWarning)
    if leftover.strip():
        units.append(Unit("text", leftover, segment.weight, segment))
    return units
