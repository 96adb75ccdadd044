"""AUTOMATIC1111's chunking: weighted pieces → 75-token chunks → 77-token windows.

The rules (facts from A1111's ``modules/sd_hijack_clip.py`` ``tokenize_line``
and ``process_tokens``; this is an independent implementation):

* Every piece of :func:`~.attention.parse_attention` is tokenized on its own
  (without start/end tokens), after A1111's tokenizer's text clean-up
  (:mod:`textenc.prompts.a1111_text`: ftfy, white space, lower case); pieces of
  equal weight were already joined.
* Tokens fill chunks of exactly 75. When a chunk is full and the next token
  is not a comma, and a comma lies at most ``comma_padding_backtrack`` tokens
  (default 20; 0 disables) from the chunk's end, the tokens after that comma
  move to the next chunk and the chunk is padded instead.
* A break piece closes the current chunk, even an empty one (so a leading
  ``BREAK`` or two in a row make an empty chunk); a trailing break adds
  nothing; an empty prompt is one empty chunk.
* A textual inversion is found by its name's tokens anywhere in a piece (the
  file name without extension, as A1111 registers it; longest name first)
  and takes one slot per vector. If it does not fit in the chunk, the chunk
  is closed first. As in A1111, comma backtracking moves the placeholders but
  not the vectors: those stay at their old offsets in the closed chunk.
* Each chunk becomes one window ``[start, 75 tokens, end]`` padded with the
  end token (SD1) or after the first end token with the tokenizer's pad
  token (``id_pad`` 0 for OpenCLIP: SD2, SDXL-G); padding weighs 1.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ....loading.embeddings import EXTENSIONS, EmbeddingResult
from ....errors import EmbeddingWarning, PromptError
from ..options import REFINEMENTS
from ...a1111_text import encode_a1111, encode_a1111_lazily
from ...vocabulary import Vocabulary
from .attention import is_break, read_attention

__all__ = ["Chunk", "Move", "Chunking", "tokenize_line", "DEFAULT_BACKTRACK"]

#: A1111's ``comma_padding_backtrack`` default (20), registered with the dialects'
#: refinements so other syntaxes refuse any other value.
DEFAULT_BACKTRACK = REFINEMENTS["comma_padding_backtrack"][1]


@dataclass
class Chunk:
    """One chunk of at most ``length`` prompt tokens (0 marks an embedding slot).

    ``fixes`` are ``(offset, vectors)``: the embedding rows that go at
    ``offset`` (in ``tokens``, before the start token is added).
    ``ended_by`` is ``"full"``, ``"comma"`` (backtracking), ``"BREAK"``,
    ``"embedding"`` (the next embedding did not fit) or ``"end"``.
    """

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    word_ids: list[int] = field(default_factory=list)
    fixes: list[tuple[int, Any]] = field(default_factory=list)
    ended_by: str = "end"


@dataclass(frozen=True)
class Move:
    """Comma backtracking moved ``tokens`` from the end of chunk ``source`` to the next."""

    source: int
    tokens: tuple[int, ...]


@dataclass
class Chunking:
    """The chunks of one prompt, where backtracking moved text, and the embeddings met.

    ``texts``, ``weights``, ``word_ids`` and ``num_tokens`` run along the pieces: their
    text and weight (:func:`~.attention.read_attention`), the word id the piece's
    tokens carry in the chunks (text pieces count from 1; a break is 0 and takes
    no number, as ComfyUI numbers groups around ``BREAK``) and how many prompt
    tokens the piece put in the chunks (one per embedding vector; 0 for a break).
    """

    texts: list[str]
    weights: list[float]
    chunks: list[Chunk]
    moves: list[Move]
    embeddings: list[EmbeddingResult]
    word_ids: list[int]
    num_tokens: list[int]

    @property
    def pieces(self) -> list[list]:
        """The pieces as ``[text, weight]`` (:func:`~.attention.parse_attention`)."""
        return list(map(list, zip(self.texts, self.weights)))


class _EmbeddingFinder:
    """A1111's embedding database over the tokenizer's embedding folders."""

    def __init__(self, tokenizer: Vocabulary) -> None:
        self.tokenizer = tokenizer
        self.found: list[EmbeddingResult] = []
        self._usable: dict[str, Any] = {}
        self._by_first: dict[int, list[tuple[list[int], str]]] = {}
        names = self._names()
        for name, ids in zip(names, encode_a1111(tokenizer, names) if names else []):
            if ids:
                self._by_first.setdefault(ids[0], []).append((ids, name))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda item: len(item[0]), reverse=True)
        #: tokens past a position that :meth:`at` may read (the longest name's, less one)
        self.lookahead = max((len(c[0][0]) - 1 for c in self._by_first.values()), default=0)

    def _names(self) -> list[str]:
        names: dict[str, None] = {}
        for directory in self.tokenizer.embedding_directories:
            for _folder, subdirs, files in os.walk(os.path.realpath(directory), followlinks=False):
                subdirs.sort()
                for file in sorted(files):
                    stem, extension = os.path.splitext(file)
                    if extension.lower() in EXTENSIONS and stem:
                        names.setdefault(stem)
        return list(names)

    def _vectors(self, name: str) -> Any:
        if name not in self._usable:
            result = self.tokenizer.lookup_embedding(name)
            self.found.append(result)
            self._usable[name] = result.vectors if result.status == "found" else None
            if result.status != "found":
                warnings.warn(f"embedding {name} skipped ({result.status}: {result.reason})",
                              EmbeddingWarning, stacklevel=6)
        return self._usable[name]

    def at(self, tokens: list[int], position: int) -> tuple[Any, int]:
        """``(vectors, number of prompt tokens its name uses)`` or ``(None, 0)``."""
        for ids, name in self._by_first.get(tokens[position], ()):
            if tokens[position:position + len(ids)] == ids:
                vectors = self._vectors(name)
                if vectors is not None:
                    return vectors, len(ids)
        return None, 0


def _too_many_chunks(max_chunks: int, length: int) -> None:
    raise PromptError(f"prompt needs more than {max_chunks} windows of {length + 2} tokens, more than "
                      f"max_windows={max_chunks} (syntax='a1111'); shorten it, or pass max_windows=None "
                      "(or a larger number) to the tokenizer or to this call")


class _Chunker:
    """The state of A1111's ``tokenize_line`` loop."""

    def __init__(self, length: int, comma: int, backtrack: int, max_chunks: int | None = None) -> None:
        self.length, self.comma, self.backtrack = length, comma, backtrack
        self.max_chunks = max_chunks
        self.chunks: list[Chunk] = []
        self.moves: list[Move] = []
        self.chunk = Chunk()
        self.last_comma = -1
        self.added = 0  # prompt tokens appended so far (backtracking moves them, never drops them)

    def close(self, reason: str) -> None:
        if self.max_chunks is not None and len(self.chunks) >= self.max_chunks:
            # refused here, before the rest of the prompt is chunked (one window per chunk)
            _too_many_chunks(self.max_chunks, self.length)
        self.chunk.ended_by = reason
        self.chunks.append(self.chunk)
        self.chunk, self.last_comma = Chunk(), -1

    def _backtrack(self) -> None:
        cut = self.last_comma + 1
        old = self.chunk
        moved = Chunk(old.tokens[cut:], old.multipliers[cut:], old.word_ids[cut:])
        del old.tokens[cut:], old.multipliers[cut:], old.word_ids[cut:]
        self.moves.append(Move(len(self.chunks), tuple(moved.tokens)))
        self.close("comma")
        self.chunk = moved  # the fixes stay behind, as in A1111

    def _before_token(self, token: int) -> None:
        size = len(self.chunk.tokens)
        if token == self.comma:
            self.last_comma = size
        elif (self.backtrack and size == self.length and self.last_comma != -1
              and size - self.last_comma <= self.backtrack):
            self._backtrack()
        if len(self.chunk.tokens) == self.length:
            self.close("full")

    def add_piece(self, tokens: list[int], weight: float, word_id: int, find: Callable,
                  position: int, stop: int) -> int:
        """Add ``tokens`` from ``position`` up to ``stop`` (an embedding name may run past
        it); returns where the next call goes on."""
        while position < stop:
            self._before_token(tokens[position])
            vectors, used = find(tokens, position)
            if vectors is None:
                self._append([tokens[position]], weight, word_id)
                position += 1
                continue
            slots = int(vectors.shape[0])
            if slots > self.length:
                raise PromptError(f"an embedding of {slots} vectors cannot fit a {self.length}-token chunk")
            if len(self.chunk.tokens) + slots > self.length:
                self.close("embedding")
            self.chunk.fixes.append((len(self.chunk.tokens), vectors))
            self._append([0] * slots, weight, word_id)
            position += used
        return position

    def _append(self, tokens: list[int], weight: float, word_id: int) -> None:
        self.added += len(tokens)
        self.chunk.tokens += tokens
        self.chunk.multipliers += [weight] * len(tokens)
        self.chunk.word_ids += [word_id] * len(tokens)


def tokenize_line(tokenizer: Vocabulary, text: str, *, comma_padding_backtrack: int = DEFAULT_BACKTRACK,
                  disable_weights: bool = False, max_chunks: int | None = None) -> Chunking:
    """Split ``text`` into A1111's chunks with ``tokenizer``'s vocabulary and embeddings.

    ``disable_weights`` reads the prompt as plain text (A1111's emphasis
    setting "None"): no brackets, no weights, no ``BREAK``. ``max_chunks`` (None:
    no limit) refuses the prompt as soon as one chunk more would be made.

    Raises:
        PromptError: a bad weight, a bad backtrack distance, an embedding
            longer than a chunk, or more than ``max_chunks`` chunks.
    """
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a str, got {type(text).__name__}")
    if isinstance(comma_padding_backtrack, bool) or not isinstance(comma_padding_backtrack, int) \
            or not 0 <= comma_padding_backtrack <= 74:
        raise PromptError(f"comma_padding_backtrack must be an int from 0 to 74, got {comma_padding_backtrack!r}")
    texts, weights = ([text], [1.0]) if disable_weights else read_attention(text)
    if max_chunks is not None and not disable_weights and sum(map(is_break, texts, weights)) > max_chunks:
        _too_many_chunks(max_chunks, tokenizer.max_length - 2)  # each break closes one chunk
    # A1111's ftfy clean-up first; encoded as it is chunked, so a refusal comes early
    token_runs = encode_a1111_lazily(tokenizer, texts)
    (comma,) = tokenizer.encode_units([","])[0][:1] or (None,)
    finder = _EmbeddingFinder(tokenizer)
    chunker = _Chunker(tokenizer.max_length - 2, comma, comma_padding_backtrack, max_chunks)
    word_ids, counts = _add_pieces(chunker, zip(texts, weights, token_runs), finder, breaks=not disable_weights)
    if chunker.chunk.tokens or not chunker.chunks:
        chunker.close("end")
    return Chunking(texts, weights, chunker.chunks, chunker.moves, finder.found, word_ids, counts)


def _add_pieces(chunker: _Chunker, pieces: Iterator[tuple[str, float, Iterator[list[int]]]],
                finder: _EmbeddingFinder, *, breaks: bool) -> tuple[list[int], list[int]]:
    """Feed every ``(text, weight, token runs)`` to ``chunker``; returns each piece's word
    id and prompt token count."""
    word_ids, counts, word_id = [], [], 0
    for text, weight, runs in pieces:
        before = chunker.added
        if breaks and is_break(text, weight):
            chunker.close("BREAK")
            word_ids.append(0)
        else:
            word_id += 1
            _add_runs(chunker, runs, weight, word_id, finder)
            word_ids.append(word_id)
        counts.append(chunker.added - before)
    return word_ids, counts


def _add_runs(chunker: _Chunker, runs: Iterator[list[int]], weight: float, word_id: int,
              finder: _EmbeddingFinder) -> None:
    """One piece, its tokens read a run at a time; a token is added once every embedding
    name that could start at it has been read (``finder.lookahead`` tokens on)."""
    tokens, position = next(runs), 0
    for run in runs:
        position = chunker.add_piece(tokens, weight, word_id, finder.at, position, len(tokens) - finder.lookahead)
        tokens, position = tokens[position:] + run, 0  # what was added is never read again
    chunker.add_piece(tokens, weight, word_id, finder.at, position, len(tokens))
