"""``SDTokenizer``: ComfyUI's prompt tokenizer, exact by default, and fast.

The output of :meth:`SDTokenizer.tokenize_with_weights` matches ComfyUI's
``comfy/sd1_clip.py`` ``SDTokenizer``: the prompt is split into weighted
segments (:mod:`textenc.prompts.parser`), each segment is split before
``" embedding:"``/``"\\nembedding:"``, every piece becomes one *group* (one
unit of text tokenized at once, or one embedding), and groups are packed into
windows of ``max_length`` tokens: ``[start, ..., end, pad...]``. A group
shorter than ``max_word_length`` (8) tokens that does not fit moves whole to
the next window; a longer one is split at the window edge. Word ids are the
group's index + 1; a text piece that tokenizes to nothing still uses an id,
as in ComfyUI. The steps have modules of their own: segments into units
(:mod:`textenc.prompts.units`), units into windows
(:mod:`textenc.prompts.packing`), the ``max_windows`` count
(:mod:`textenc.prompts.budget`), the Rust pipeline (:mod:`textenc.prompts.clip_backend`)
and :meth:`SDTokenizer.inspect`'s records (:mod:`textenc.prompts.report`);
this module drives them and holds the token cache.

Differences from ComfyUI, all deliberate:

* Tokenizing uses the Rust ``tokenizers`` backend built to match
  ``transformers.CLIPTokenizer`` (NFC, whitespace collapse, lower case, CLIP's
  split regex, byte-level BPE with ``</w>``), every piece of a prompt in one
  ``encode_batch`` call, with a bounded per-instance cache. Lone surrogates
  (which make HF raise) are replaced by U+FFFD first.
* Embedding names end at the first whitespace; a name not found is tried
  again with commas stripped from both ends (as ComfyUI), and the stripped
  commas stay in the prompt as text, where they were (ComfyUI re-inserts the
  name's last characters instead of leading commas). Text after the name is
  tokenized normally. ``embedding:`` with nothing (or a space) after the
  colon is plain text, so it never swallows the next word (ComfyUI loads the
  next word as the name). Missing, unsafe or invalid embeddings, and
  ``embedding:NAME`` with no embedding directory, emit
  :class:`~textenc.errors.EmbeddingWarning` attributed to the caller's line,
  and the prompt goes on.
* ``max_windows`` (default 256) refuses a prompt that needs more windows,
  while it is being tokenized (ComfyUI encodes any length).
* ``BREAK`` (``break_keyword=True``) closes the current window unless it is
  empty.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterable, Sequence

from textenc.prompts.clip_backend import build_backend, fix_surrogates, is_clip_pipeline
# The dialect modules are loaded here, up front, so that tokenizing never imports a module mid-call.
from textenc.prompts.limits import check_prompt_size, check_windows
from textenc.prompts.dialects import a1111, comfy, compel, check_refinements, dialect_options, get_dialect  # noqa: F401
from textenc.loading.embeddings import NO_DIRECTORY, EmbeddingLoader, EmbeddingResult
from textenc.errors import PromptError, PromptWarning
from textenc.prompts.report import InspectReport, TokenReport, UnitReport
from textenc.lru import LRUCache
from textenc.prompts.parser import ParseOptions, Segment, describe_large_weights, iter_segments, large_weights
from textenc.prompts.units import EMBEDDING_IDENTIFIER, Unit, split_units
from textenc.prompts.budget import TokenBudget, check_max_windows, space_chunks
from textenc.warn import warn_at_caller
from textenc.prompts.packing import pack_windows

__all__ = ["SDTokenizer", "InspectReport", "UnitReport", "TokenReport", "DEFAULT_VOCAB"]

DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vocab")  # textenc/vocab
_PER_CALL_PARSE_OPTIONS = ("weight_convention", "square_brackets", "break_keyword", "max_weight",
                           "strict_weights", "warn_weight_above")
_CHUNK_CHARS = 1 << 16  # text tokenized per step while counting towards max_windows


def _checked_dialect(kwargs: dict):
    """The dialect of ``kwargs.pop("syntax")``, after refusing another dialect's option
    or refinement (e.g. ``truncate_long_prompts=False`` without ``syntax="compel"``,
    ``square_brackets=True`` with ``syntax="a1111"``)."""
    syntax = kwargs.pop("syntax", None)
    dialect_options(syntax, kwargs)
    check_refinements(syntax, kwargs)
    return get_dialect(syntax)


class SDTokenizer:
    """ComfyUI's ``SDTokenizer``; positional parameters keep ComfyUI's order.

    Args:
        tokenizer_path: folder with ``vocab.json`` + ``merges.txt`` or with
            ``tokenizer.json``; default the bundled CLIP vocabulary.
        max_length: window length (77).
        pad_with_end: pad with the end token (SD1) or with 0 (SD2, SDXL-G).
        embedding_directory: folder or folders of textual inversions.
        embedding_size: embedding width (768, 1024, 1280).
        embedding_key: key for multi-encoder embedding files and tokenizer_data.
        tokenizer_class: a transformers tokenizer class to use instead of the
            Rust backend (slower; ComfyUI's way).
        weight_convention, square_brackets, break_keyword, max_weight,
            max_prompt_chars, strict_weights, warn_weight_above: prompt
            syntax and weight policy, see :mod:`textenc.prompts.parser`.
        max_windows: most windows a prompt may need (default 256, about
            19,000 tokens); checked while tokenizing, before anything is
            encoded; None disables it. Also a per-call keyword.
        cache_size: number of tokenized units remembered.

    >>> tok = SDTokenizer()
    >>> [t for t, _ in tok.tokenize_with_weights("a cat")[0][:4]]
    [49406, 320, 2368, 49407]
    """

    def __init__(self, tokenizer_path: str | None = None, max_length: int = 77, pad_with_end: bool = True,
                 embedding_directory: str | Sequence[str] | None = None, embedding_size: int = 768,
                 embedding_key: str = "clip_l", tokenizer_class: Any = None, has_start_token: bool = True,
                 has_end_token: bool = True, pad_to_max_length: bool = True, min_length: int | None = None,
                 pad_token: int | None = None, end_token: int | None = None, min_padding: int | None = None,
                 tokenizer_data: dict | None = None, *, weight_convention: str = "comfy",
                 square_brackets: bool = False, break_keyword: bool = False, max_weight: float | None = None,
                 max_prompt_chars: int = 1_048_576, strict_weights: bool = False,
                 warn_weight_above: float | None = 100.0, max_windows: int | None = 256,
                 cache_size: int = 8192) -> None:
        tokenizer_data = tokenizer_data or {}
        folder = tokenizer_path if tokenizer_path is not None else DEFAULT_VOCAB
        self._hf = tokenizer_class.from_pretrained(folder) if tokenizer_class is not None else None
        self._backend = build_backend(folder) if self._hf is None else None
        self.max_length = tokenizer_data.get(f"{embedding_key}_max_length", max_length)
        self.min_length = tokenizer_data.get(f"{embedding_key}_min_length", min_length)
        self.min_padding = min_padding
        self.pad_to_max_length = pad_to_max_length
        self.pad_with_end = pad_with_end
        self._setup_special_tokens(has_start_token, has_end_token, pad_token, end_token)
        self.inv_vocab = {v: k for k, v in self._vocab().items()}
        self.embedding_directory = embedding_directory
        self.embedding_size = embedding_size
        self.embedding_key = embedding_key
        self.max_word_length = 8
        self.embedding_identifier = EMBEDDING_IDENTIFIER
        self.parse_options = ParseOptions(weight_convention, square_brackets, break_keyword, max_weight,
                                          max_prompt_chars, strict_weights, warn_weight_above)
        self.max_windows = check_max_windows(max_windows)
        self._cache = LRUCache(cache_size)  # unit text -> token ids
        self._by_word = (self._backend is not None and self.tokens_start == 1 and has_end_token
                         and end_token is None and is_clip_pipeline(self._backend))
        self._embeddings = (EmbeddingLoader(embedding_directory, embedding_size, embed_key=embedding_key)
                            if embedding_directory is not None else None)

    def _setup_special_tokens(self, has_start: bool, has_end: bool, pad: int | None, end: int | None) -> None:
        """ComfyUI's reading of the start/end tokens from the empty prompt."""
        empty = self._raw_encode([""])[0]
        self.tokens_start = 1 if has_start and empty else 0
        self.start_token = empty[0] if has_start and empty else None
        self.tokenizer_adds_end_token = has_end
        self.end_token = end
        if end is None and has_end:
            self.end_token = empty[self.tokens_start]
        self.pad_token = pad if pad is not None else (self.end_token if self.pad_with_end else 0)

    def _vocab(self) -> dict[str, int]:
        return self._hf.get_vocab() if self._hf is not None else self._backend.get_vocab(with_added_tokens=True)

    def _raw_encode(self, texts: list[str], *, special: bool = True) -> list[list[int]]:
        """Ids with the tokenizer's own start/end tokens, for every text."""
        texts = [fix_surrogates(t) for t in texts]
        if self._hf is not None:
            return [list(ids) for ids in self._hf(texts)["input_ids"]] if texts else []
        if not texts:
            return []
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)  # no offsets
        return [e.ids for e in encode(texts, add_special_tokens=special)]

    def encode_units(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text unit, without start/end tokens (ComfyUI's slice).

        With a CLIP pipeline, units are split at ASCII spaces and words are
        cached: CLIP's normaliser and split regex never join text across a
        space, so the concatenation equals tokenizing the whole unit.
        """
        if not self._by_word:
            return self._encode_cached(list(texts), special=True)
        words = [[w for w in text.split(" ") if w] for text in texts]
        flat = [w for unit in words for w in unit]
        table = dict(zip(flat, self._encode_cached(flat, special=False)))
        return [[t for w in unit for t in table[w]] for unit in words]

    def _encode_cached(self, texts: list[str], *, special: bool) -> list[list[int]]:
        out = self._cache.get_many(texts)
        missing = sorted({t for t, ids in zip(texts, out) if ids is None})
        if special:
            stop = -1 if self.tokenizer_adds_end_token else None
            fresh = dict(zip(missing, (ids[self.tokens_start:stop] for ids in self._raw_encode(missing))))
        else:
            fresh = dict(zip(missing, self._raw_encode(missing, special=False)))
        self._cache.put_many(fresh)
        return [ids if ids is not None else fresh[t] for t, ids in zip(texts, out)]

    def _max_windows(self, kwargs: dict) -> int | None:
        """The call's ``max_windows``, else the tokenizer's."""
        return check_max_windows(kwargs["max_windows"]) if "max_windows" in kwargs else self.max_windows

    def _parse_options(self, kwargs: dict) -> ParseOptions:
        """Instance parse options, overridden per call (never mutated) by ``kwargs``."""
        overrides = {k: kwargs[k] for k in _PER_CALL_PARSE_OPTIONS if k in kwargs}
        return dataclasses.replace(self.parse_options, **overrides) if overrides else self.parse_options

    def _segments(self, text: str, disable_weights: bool, options: ParseOptions | None = None) -> Iterable[Segment]:
        """The prompt's segments, lazily (parsed one top-level group at a time)."""
        options = options or self.parse_options
        if not isinstance(text, str):
            raise PromptError(f"a prompt must be a str, got {type(text).__name__}")
        text = fix_surrogates(text)
        if disable_weights:  # ComfyUI still resolves the escapes
            if len(text) > options.max_prompt_chars:
                raise PromptError(f"prompt has {len(text)} characters, more than max_prompt_chars")
            return [Segment(re.sub(r"\\([()])", r"\1", text), 1.0, 0, len(text))] if text else []
        return iter_segments(text, options)

    def window_capacity(self) -> int:
        """Prompt tokens one window holds: ``max_length`` less the start and end tokens."""
        specials = (self.start_token is not None) + (self.end_token is not None)
        return max(1, self.max_length - specials)

    def _stream_units(self, segments: Iterable[Segment], found: list[EmbeddingResult],
                      counter: TokenBudget) -> tuple[list[Unit], list[Segment]]:
        """Parse, split and tokenize in steps of ~64K characters of segments, so that
        ``max_windows`` refuses a huge prompt before most of it is parsed or tokenized."""
        units: list[Unit] = []
        seen: list[Segment] = []
        pending: list[Segment] = []
        pending_chars = 0
        for segment in segments:
            pending.append(segment)
            pending_chars += len(segment.text)
            if pending_chars >= _CHUNK_CHARS:
                units += self._fill_tokens(split_units(pending, self._embeddings, found), counter)
                seen += pending
                pending, pending_chars = [], 0
        units += self._fill_tokens(split_units(pending, self._embeddings, found), counter)
        return units, seen + pending

    def _fill_tokens(self, units: list[Unit], counter: TokenBudget) -> list[Unit]:
        """Tokenize the text groups in steps of ~64K characters, refusing (PromptError) as soon
        as their tokens cannot fit ``max_windows`` windows, so that a huge prompt is refused
        before it is tokenized, let alone encoded."""
        counter.add(sum(len(u.tokens) for u in units if u.kind == "embedding"), 0)
        batch: list[Unit] = []
        batch_chars = 0
        for unit in (u for u in units if u.kind == "text"):
            if self._by_word and len(unit.text) > _CHUNK_CHARS:
                self._fill_batch(batch, counter)
                batch, batch_chars = [], 0
                unit.tokens = self._tokens_of_long_unit(unit, counter)
                continue
            batch.append(unit)
            batch_chars += len(unit.text)
            if batch_chars >= _CHUNK_CHARS:
                self._fill_batch(batch, counter)
                batch, batch_chars = [], 0
        self._fill_batch(batch, counter)
        return units

    def _fill_batch(self, batch: list[Unit], counter: TokenBudget) -> None:
        for unit, ids in zip(batch, self.encode_units([u.text for u in batch])):
            unit.tokens = [(t, unit.weight) for t in ids]
            counter.add(len(ids), len(unit.text))

    def _tokens_of_long_unit(self, unit: Unit, counter: TokenBudget) -> list[tuple]:
        """A long text group, tokenized chunk by chunk (cut at spaces: CLIP never joins across one)."""
        tokens: list[tuple] = []
        for chunk in space_chunks(unit.text, _CHUNK_CHARS):
            ids = self.encode_units([chunk])[0]
            tokens.extend((t, unit.weight) for t in ids)
            counter.add(len(ids), len(chunk))
        return tokens

    def _run(self, text: str, kwargs: dict) -> tuple[list[list], list[Unit], list[EmbeddingResult]]:
        options = kwargs.get("tokenizer_options") or {}
        min_length = options.get(f"{self.embedding_key}_min_length", self.min_length)
        min_length = kwargs.get("min_length", min_length)
        min_padding = options.get(f"{self.embedding_key}_min_padding", self.min_padding)
        max_windows = self._max_windows(kwargs)
        found: list[EmbeddingResult] = []
        parse_options = self._parse_options(kwargs)
        segments = self._segments(text, bool(kwargs.get("disable_weights", False)), parse_options)
        units, seen = self._stream_units(segments, found, TokenBudget(self, max_windows, len(text)))
        heavy = large_weights(seen, parse_options)
        if heavy:
            warn_at_caller(describe_large_weights(heavy, parse_options), PromptWarning)
        windows = pack_windows(units, self, min_length=min_length, min_padding=min_padding)
        if max_windows is not None and len(windows) > max_windows:
            raise PromptError(f"prompt needs {len(windows)} windows of {self.max_length} tokens, more than "
                              f"max_windows={max_windows}; shorten it, or pass max_windows=None (or a larger "
                              "number) to the tokenizer or to this call")
        return windows, units, found

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> list[list[tuple]]:
        """Windows of ``(token, weight)`` or ``(token, weight, word_id)``.

        ``syntax=`` picks the prompt dialect (``"comfy"`` default, ``"a1111"``,
        ``"compel"``; see :mod:`textenc.prompts.dialects`); the rest is ComfyUI's, plus the
        dialect's own options (``truncate_long_prompts`` for compel, default True).

        Raises:
            PromptError: unknown syntax, another dialect's option at a value other
                than its default, or what the dialect refuses.
        """
        dialect = _checked_dialect(kwargs)
        if dialect.applies_limits:
            return dialect.tokenize_with_weights(self, text, return_word_ids, **kwargs)
        options = self._parse_options(kwargs)
        check_prompt_size(text, options, dialect.name)
        windows = dialect.tokenize_with_weights(self, text, return_word_ids, **kwargs)
        check_windows(self, windows, options, self._max_windows(kwargs), dialect.name)
        return windows

    def tokenize_comfy(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> list[list[tuple]]:
        """ComfyUI's windows of ``(token, weight)`` or ``(token, weight, word_id)``.

        Tokens are ints, or 1-D tensors (one embedding vector each).
        ``kwargs`` understood: ``min_length``, ``tokenizer_options``,
        ``disable_weights`` (as ComfyUI), and per-call prompt syntax
        ``weight_convention``, ``square_brackets``, ``break_keyword`` (override the
        constructor's for this call only); others are ignored, as in ComfyUI.

        Raises:
            PromptError: the prompt is not a str, too long or has a refused weight.
        """
        windows, _units, _found = self._run(text, kwargs)
        if not return_word_ids:
            return [[(t, w) for t, w, _ in window] for window in windows]
        return windows

    def token_text(self, token: Any) -> str:
        """The vocabulary text of ``token``: ``"<unknown>"`` for an id not in the
        vocabulary, ``"<embedding>"`` for an embedding vector (a tensor).

        >>> SDTokenizer().token_text(2368)
        'cat</w>'
        """
        return self.inv_vocab.get(token, "<unknown>") if isinstance(token, int) else "<embedding>"

    @property
    def embedding_directories(self) -> list[str]:
        """The embedding folders this tokenizer searches (empty when none was given)."""
        return list(self._embeddings.directories) if self._embeddings is not None else []

    def lookup_embedding(self, name: str) -> EmbeddingResult:
        """Find, read and validate the embedding ``name`` in :attr:`embedding_directories`
        (files are cached). Never raises for a bad file or name: the result's ``status`` is
        ``"found"``, ``"missing"`` (also when there is no embedding directory) or
        ``"rejected"``, with the reason.
        """
        if self._embeddings is None:
            return EmbeddingResult(name, "missing", reason=NO_DIRECTORY)
        return self._embeddings.lookup(name)

    def untokenize(self, token_weight_pair: Sequence[tuple]) -> list[tuple[tuple, str]]:
        """Pair each ``(token, weight[, id])`` with its vocabulary text, as ComfyUI."""
        return [(pair, self.token_text(pair[0])) for pair in token_weight_pair]

    def inspect(self, text: str, **kwargs: Any) -> InspectReport:
        """Tokenize ``text`` and report windows, units and embeddings, for debugging prompts.

        ``syntax=`` picks the prompt dialect, as in :meth:`tokenize_with_weights`.
        """
        dialect = _checked_dialect(kwargs)
        if dialect.applies_limits:
            return dialect.inspect(self, text, **kwargs)
        options = self._parse_options(kwargs)
        check_prompt_size(text, options, dialect.name)
        report = dialect.inspect(self, text, **kwargs)
        pairs = [[(t.token if t.token is not None else t.text, t.weight) for t in window]
                 for window in report.windows]
        check_windows(self, pairs, options, self._max_windows(kwargs), dialect.name)
        return report

    def inspect_comfy(self, text: str, **kwargs: Any) -> InspectReport:
        """ComfyUI's reading of ``text`` as an :class:`InspectReport`."""
        windows, units, found = self._run(text, kwargs)
        segments = {id(u.segment): u.segment for u in units}.values()
        heavy = large_weights(list(segments), self._parse_options(kwargs))
        reports, word_id = [], 0
        for unit in units:
            word_id += unit.kind != "break"
            reports.append(UnitReport(word_id if unit.kind != "break" else 0, unit.kind, unit.text,
                                      unit.weight, unit.segment.start, unit.segment.end, len(unit.tokens)))
        token_windows = [[TokenReport(t if isinstance(t, int) else None, self.token_text(t), w, i)
                          for t, w, i in window] for window in windows]
        return InspectReport(token_windows, reports, found, heavy)

    def state_dict(self) -> dict:
        """Nothing to save (ComfyUI API)."""
        return {}

