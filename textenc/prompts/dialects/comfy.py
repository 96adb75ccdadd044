"""ComfyUI's prompt dialect (``syntax="comfy"``, the default), exact by default, and fast.

The windows match ComfyUI's ``comfy/sd1_clip.py`` ``SDTokenizer.tokenize_with_weights``:
the prompt is split into weighted segments (:mod:`textenc.prompts.parser`),
each segment is split before ``" embedding:"``/``"\\nembedding:"``, every
piece becomes one *group* (one unit of text tokenized at once, or one
embedding), and groups are packed into windows of ``max_length`` tokens:
``[start, ..., end, pad...]``. A group shorter than ``max_word_length`` (8)
tokens that does not fit moves whole to the next window; a longer one is split
at the window edge. Word ids are the group's index + 1; a text piece that
tokenizes to nothing still uses an id, as in ComfyUI. The steps have modules
of their own: segments into units (:mod:`textenc.prompts.units`), units into
windows (:mod:`textenc.prompts.packing`), the ``max_windows`` count
(:mod:`textenc.prompts.budget`) and :class:`~textenc.prompts.report.InspectReport`'s
records (:mod:`textenc.prompts.report`); this module drives them over a
:class:`~textenc.prompts.tokenizer.Vocabulary`.

Differences from ComfyUI, all deliberate:

* Tokenizing uses the Rust ``tokenizers`` backend built to match
  ``transformers.CLIPTokenizer`` (NFC, whitespace collapse, lower case, CLIP's
  split regex, byte-level BPE with ``</w>``), every piece of a prompt in one
  ``encode_batch`` call, with a bounded per-instance cache
  (:mod:`textenc.prompts.clip_backend`). Lone surrogates (which make HF raise)
  are replaced by U+FFFD first.
* Embedding names end at the first whitespace; a name not found is tried
  again with commas stripped from both ends (as ComfyUI), and the stripped
  commas stay in the prompt as text, where they were (ComfyUI re-inserts the
  name's last characters instead of leading commas). Text after the name is
  tokenized normally. ``embedding:`` with no word after it (at the end of the
  prompt, or before only whitespace) is plain text (ComfyUI raises
  ``IndexError`` with an embedding folder). Missing, unsafe or invalid embeddings, and
  ``embedding:NAME`` with no embedding directory, emit
  :class:`~textenc.errors.EmbeddingWarning` attributed to the caller's line,
  and the prompt goes on.
* ``max_windows`` (default 256) refuses a prompt that needs more windows,
  while it is being tokenized (ComfyUI encodes any length).
* ``BREAK`` (``break_keyword=True``) closes the current window unless it is
  empty.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, NamedTuple

from ...errors import PromptError, PromptWarning
from ...loading.embeddings import EmbeddingResult
from ...warn import warn_at_caller
from ..budget import TokenBudget, space_chunks
from ..clip_backend import fix_surrogates
from ..packing import pack_windows
from ..parser import ParseOptions, Segment, describe_large_weights, iter_segments, large_weights
from ..report import InspectReport, TokenReport, UnitReport
from ..units import Unit, split_units
from ..vocabulary import Vocabulary

__all__ = ["ComfyDialect", "DIALECT", "ComfyReading", "read_prompt"]

_CHUNK_CHARS = 1 << 16  # text tokenized per step while counting towards max_windows


class ComfyReading(NamedTuple):
    """A prompt as ComfyUI reads it: windows of ``(token, weight, word_id)``, the units
    (groups) they were packed from, and every embedding lookup's result."""

    windows: list[list[tuple]]
    units: list[Unit]
    embeddings: list[EmbeddingResult]


def _segments(text: str, disable_weights: bool, options: ParseOptions) -> Iterable[Segment]:
    """The prompt's segments, lazily (parsed one top-level group at a time)."""
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a str, got {type(text).__name__}")
    text = fix_surrogates(text)
    if disable_weights:  # ComfyUI still resolves the escapes
        if len(text) > options.max_prompt_chars:
            raise PromptError(f"prompt has {len(text)} characters, more than max_prompt_chars")
        return [Segment(re.sub(r"\\([()])", r"\1", text), 1.0, 0, len(text))] if text else []
    return iter_segments(text, options)


def _stream_units(tokenizer: Vocabulary, segments: Iterable[Segment], found: list[EmbeddingResult],
                  budget: TokenBudget) -> tuple[list[Unit], list[Segment]]:
    """Parse, split and tokenize in steps of ~64K characters of segments, so that
    ``max_windows`` refuses a huge prompt before most of it is parsed or tokenized.
    Returns the tokenized units and the segments read."""
    units: list[Unit] = []
    seen: list[Segment] = []
    pending: list[Segment] = []
    pending_chars = 0
    for segment in segments:
        pending.append(segment)
        pending_chars += len(segment.text)
        if pending_chars >= _CHUNK_CHARS:
            units += _fill_tokens(tokenizer, split_units(pending, tokenizer.embedding_loader, found), budget)
            seen += pending
            pending, pending_chars = [], 0
    units += _fill_tokens(tokenizer, split_units(pending, tokenizer.embedding_loader, found), budget)
    return units, seen + pending


def _fill_tokens(tokenizer: Vocabulary, units: list[Unit], budget: TokenBudget) -> list[Unit]:
    """Tokenize the text groups in steps of ~64K characters, refusing (PromptError) as soon
    as their tokens cannot fit ``max_windows`` windows, so that a huge prompt is refused
    before it is tokenized, let alone encoded."""
    budget.add(sum(len(u.tokens) for u in units if u.kind == "embedding"), 0)
    batch: list[Unit] = []
    batch_chars = 0
    splits_at_spaces = tokenizer.splits_at_spaces
    for unit in (u for u in units if u.kind == "text"):
        if splits_at_spaces and len(unit.text) > _CHUNK_CHARS:
            _fill_batch(tokenizer, batch, budget)
            batch, batch_chars = [], 0
            unit.tokens = _tokens_of_long_unit(tokenizer, unit, budget)
            continue
        batch.append(unit)
        batch_chars += len(unit.text)
        if batch_chars >= _CHUNK_CHARS:
            _fill_batch(tokenizer, batch, budget)
            batch, batch_chars = [], 0
    _fill_batch(tokenizer, batch, budget)
    return units


def _fill_batch(tokenizer: Vocabulary, batch: list[Unit], budget: TokenBudget) -> None:
    all_ids = tokenizer.encode_units([u.text for u in batch])
    for unit, ids in zip(batch, all_ids):
        weight = unit.weight
        unit.tokens = [(t, weight) for t in ids]
    budget.add_many([(len(ids), len(unit.text)) for unit, ids in zip(batch, all_ids)])


def _tokens_of_long_unit(tokenizer: Vocabulary, unit: Unit, budget: TokenBudget) -> list[tuple]:
    """A long text group, tokenized chunk by chunk (cut at spaces: CLIP never joins across one)."""
    tokens: list[tuple] = []
    for chunk in space_chunks(unit.text, _CHUNK_CHARS):
        ids = tokenizer.encode_units([chunk])[0]
        tokens.extend((t, unit.weight) for t in ids)
        budget.add(len(ids), len(chunk))
    return tokens


def read_prompt(tokenizer: Vocabulary, text: str, call_options: dict, *, word_ids: bool = True) -> ComfyReading:
    """``text`` read as ComfyUI reads it, with ``vocabulary``'s tokens, embeddings and limits;
    windows of ``(token, weight, word_id)``, or of ``(token, weight)`` with ``word_ids=False``.

    ``call_options`` understood: ``min_length``, ``tokenizer_options``,
    ``disable_weights`` (as ComfyUI), ``max_windows`` and the per-call parse options
    (:data:`textenc.prompts.tokenizer.PER_CALL_PARSE_OPTIONS`); others are ignored,
    as in ComfyUI.

    Raises:
        PromptError: the prompt is not a str, too long or has a refused weight.
    """
    options = call_options.get("tokenizer_options") or {}
    min_length = options.get(f"{tokenizer.embedding_key}_min_length", tokenizer.min_length)
    min_length = call_options.get("min_length", min_length)
    min_padding = options.get(f"{tokenizer.embedding_key}_min_padding", tokenizer.min_padding)
    max_windows = tokenizer.max_windows_for(call_options)
    found: list[EmbeddingResult] = []
    parse_options = tokenizer.parse_options_for(call_options)
    segments = _segments(text, bool(call_options.get("disable_weights", False)), parse_options)
    units, seen = _stream_units(tokenizer, segments, found, TokenBudget(tokenizer, max_windows, len(text)))
    heavy = large_weights(seen, parse_options)
    if heavy:
        warn_at_caller(describe_large_weights(heavy, parse_options), PromptWarning)
    windows = pack_windows(units, tokenizer, min_length=min_length, min_padding=min_padding, word_ids=word_ids)
    if max_windows is not None and len(windows) > max_windows:
        raise PromptError(f"prompt needs {len(windows)} windows of {tokenizer.max_length} tokens, more than "
                          f"max_windows={max_windows}; shorten it, or pass max_windows=None (or a larger "
                          "number) to the tokenizer or to this call")
    return ComfyReading(windows, units, found)


class ComfyDialect:
    """ComfyUI's reading; it applies the tokenizer's limits itself, while parsing."""

    name = "comfy"
    default_weight_mode = "comfy"
    applies_limits = True
    schedule_encoding = None  # no prompt editing: one text per prompt
    pads_to_min_length = True

    def tokenize_with_weights(self, tokenizer: Vocabulary, text: str, return_word_ids: bool,
                              **kwargs: Any) -> list[list[tuple]]:
        """ComfyUI's windows of ``(token, weight)`` or ``(token, weight, word_id)``.

        Tokens are ints, or 1-D tensors (one embedding vector each); ``kwargs`` as
        :func:`read_prompt`'s ``call_options``.
        """
        return read_prompt(tokenizer, text, kwargs, word_ids=bool(return_word_ids)).windows

    def inspect(self, tokenizer: Vocabulary, text: str, **kwargs: Any) -> InspectReport:
        """ComfyUI's reading of ``text`` as an :class:`~textenc.prompts.report.InspectReport`."""
        windows, units, found = read_prompt(tokenizer, text, kwargs)
        segments = {id(u.segment): u.segment for u in units}.values()
        heavy = large_weights(list(segments), tokenizer.parse_options_for(kwargs))
        reports, word_id = [], 0
        for unit in units:
            word_id += unit.kind != "break"
            reports.append(UnitReport(word_id if unit.kind != "break" else 0, unit.kind, unit.text,
                                      unit.weight, unit.segment.start, unit.segment.end, len(unit.tokens)))
        token_windows = [[TokenReport(t if isinstance(t, int) else None, tokenizer.token_text(t), w, i)
                          for t, w, i in window] for window in windows]
        return InspectReport(token_windows, reports, found, heavy)


DIALECT = ComfyDialect()
