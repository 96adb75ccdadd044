"""The ``a1111`` dialect object: A1111's chunks as 77-token windows, and its inspect report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ....errors import PromptError
from ...report import InspectReport, TokenReport, UnitReport
from ...vocabulary import Vocabulary
from .chunks import DEFAULT_BACKTRACK, Chunk, Chunking, tokenize_line
from .report import A1111InspectReport
from .schedule import prompt_schedule, split_and

__all__ = ["A1111Dialect", "DIALECT", "chunk_windows"]

_OPTIONS = ("comma_padding_backtrack", "disable_weights")


def _window(tokenizer: Vocabulary, chunk: Chunk) -> list[tuple]:
    """``[start, 75 tokens, end]`` as ``(token, weight, word_id)``, padded as A1111 pads."""
    free = tokenizer.max_length - 2 - len(chunk.tokens)
    end = tokenizer.end_token
    pad = tokenizer.pad_token  # A1111's id_pad: the end token for CLIP-L, 0 for OpenCLIP
    tokens: list[Any] = [tokenizer.start_token, *chunk.tokens, end] + [pad] * free
    weights = [1.0, *chunk.multipliers] + [1.0] * (free + 1)
    word_ids = [0, *chunk.word_ids] + [0] * (free + 1)
    for offset, vectors in chunk.fixes:  # after the start token, cut at the window's end
        rows = min(int(vectors.shape[0]), len(tokens) - offset - 1)
        for row in range(rows):
            tokens[offset + 1 + row] = vectors[row]
    return list(zip(tokens, weights, word_ids))


def chunk_windows(tokenizer: Vocabulary, chunking: Chunking) -> list[list[tuple]]:
    """One 77-token window per chunk.

    Raises:
        PromptError: the tokenizer has no start or end token (A1111's chunks need both).
    """
    if tokenizer.start_token is None or tokenizer.end_token is None:
        raise PromptError("syntax='a1111' needs a CLIP tokenizer with start and end tokens")
    return [_window(tokenizer, chunk) for chunk in chunking.chunks]


def _chunking(tokenizer: Vocabulary, text: str, kwargs: dict) -> Chunking:
    return tokenize_line(tokenizer, text,
                         comma_padding_backtrack=kwargs.get("comma_padding_backtrack", DEFAULT_BACKTRACK),
                         disable_weights=bool(kwargs.get("disable_weights", False)),
                         max_chunks=tokenizer.max_windows_for(kwargs))  # one window per chunk


def _units(chunking: Chunking) -> list[UnitReport]:
    """One unit per piece, with the word id its tokens carry and its prompt token count; a
    break as ComfyUI reports one (word 0, weight 1, no tokens), not A1111's -1 marker."""
    return [UnitReport(0, "break", "BREAK", 1.0, -1, -1, 0) if word_id == 0
            else UnitReport(word_id, "text", piece[0], piece[1], -1, -1, count)
            for piece, word_id, count in zip(chunking.pieces, chunking.word_ids, chunking.num_tokens)]


@dataclass(frozen=True)
class ChunkReport:
    """One A1111 chunk: its prompt tokens and why it ended (see ``chunks.Chunk``)."""

    index: int
    num_tokens: int
    ended_by: str


@dataclass(frozen=True)
class MoveReport:
    """Comma backtracking moved ``text`` (``num_tokens`` tokens) from chunk ``source`` to the next."""

    source: int
    num_tokens: int
    text: str


class A1111Dialect:
    """AUTOMATIC1111's prompt reading (grammar, chunking, schedule); see the package docs.

    ``tokenize_with_weights`` keywords: ``comma_padding_backtrack`` (int, 0-74,
    default 20; 0 disables), ``disable_weights`` (plain text, A1111's emphasis
    "None"); ComfyUI's ``min_length`` and ``tokenizer_options`` do not apply.
    """

    name = "a1111"
    default_weight_mode = "a1111"
    applies_limits = False
    #: the texts of one schedule are encoded in one batch, as A1111 does
    #: (:func:`textenc.text_encoders.schedules.encode_a1111_schedule`).
    schedule_encoding = "a1111"
    pads_to_min_length = True

    def tokenize_with_weights(self, tokenizer: Vocabulary, text: str, return_word_ids: bool,
                              **kwargs: Any) -> list[list[tuple]]:
        windows = chunk_windows(tokenizer, _chunking(tokenizer, text, kwargs))
        if not return_word_ids:
            return [[(t, w) for t, w, _ in window] for window in windows]
        return windows

    def inspect(self, tokenizer: Vocabulary, text: str, **kwargs: Any) -> InspectReport:
        chunking = _chunking(tokenizer, text, kwargs)
        windows = [[TokenReport(t if isinstance(t, int) else None, tokenizer.token_text(t), w, i)
                    for t, w, i in window] for window in chunk_windows(tokenizer, chunking)]
        chunks = [ChunkReport(i, len(c.tokens), c.ended_by) for i, c in enumerate(chunking.chunks)]
        moves = [MoveReport(m.source, len(m.tokens), "".join(tokenizer.token_text(t) for t in m.tokens)
                            .replace("</w>", " ").strip()) for m in chunking.moves]
        return A1111InspectReport(windows, _units(chunking), chunking.embeddings, chunks=chunks, moves=moves)

    def prompt_schedules(self, text: str, steps: int, *, split: bool = True) -> list[tuple[float, list]]:
        """``[(weight, [(end_step, text), ...]), ...]``: one schedule per ``AND`` part."""
        parts = split_and(text) if split else [(text, 1.0)]
        return [(weight, prompt_schedule(part, steps)) for part, weight in parts]


DIALECT = A1111Dialect()
