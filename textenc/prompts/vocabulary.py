"""``Vocabulary``: the part of a tokenizer that every prompt dialect reads.

A dialect (:mod:`textenc.prompts.dialects`) turns a prompt into token windows
with its own grammar and chunking; what it needs from the tokenizer is this
class's public interface, and nothing else:

* the vocabulary: :meth:`Vocabulary.encode_units` (text → ids, without start
  and end tokens, cached), :meth:`Vocabulary.token_text` and ``inv_vocab``
  (id → text);
* the window shape: ``max_length``, ``min_length``, ``min_padding``,
  ``max_word_length``, ``pad_to_max_length``, the special tokens
  ``start_token`` / ``end_token`` / ``pad_token`` and
  :meth:`Vocabulary.window_capacity`;
* textual inversions: :meth:`Vocabulary.lookup_embedding`,
  :attr:`Vocabulary.embedding_directories` and :attr:`Vocabulary.embedding_loader`;
* the prompt limits: ``parse_options`` and ``max_windows``, resolved per call by
  :meth:`Vocabulary.parse_options_for` and :meth:`Vocabulary.max_windows_for`.

:class:`textenc.prompts.tokenizer.SDTokenizer` (ComfyUI's name) builds on it and
hands each prompt to the dialect named by ``syntax=``; dialects import this
module, never the tokenizer, so imports point one way.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from itertools import chain
from typing import Any, Mapping, Sequence

from textenc.errors import ConfigError
from textenc.loading.embeddings import NO_DIRECTORY, EmbeddingLoader, EmbeddingResult
from textenc.lru import LRUCache
from textenc.prompts.budget import check_max_windows
from textenc.prompts.clip_backend import build_backend, fix_surrogates, is_clip_pipeline
from textenc.prompts.parser import ParseOptions
from textenc.prompts.units import EMBEDDING_IDENTIFIER

__all__ = ["Vocabulary", "DEFAULT_VOCAB", "PER_CALL_PARSE_OPTIONS"]

DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vocab")  # textenc/vocab
#: Parse options a call may override (``tokenize_with_weights(text, square_brackets=True)``).
PER_CALL_PARSE_OPTIONS = ("weight_convention", "square_brackets", "break_keyword", "max_weight",
                          "strict_weights", "warn_weight_above")


class Vocabulary:
    """A tokenizer's vocabulary, window shape, embeddings and limits.

    Takes ComfyUI's ``SDTokenizer`` parameters, in ComfyUI's order; they are
    documented on :class:`textenc.prompts.tokenizer.SDTokenizer`.
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
                 cache_size: int = 8192, embedding_any_width: bool = False) -> None:
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
        self.max_word_length = 8
        self._check_max_length()
        self.embedding_directory = embedding_directory
        self.embedding_size = embedding_size
        self.embedding_key = embedding_key
        self.embedding_identifier = EMBEDDING_IDENTIFIER
        self.parse_options = ParseOptions(weight_convention, square_brackets, break_keyword, max_weight,
                                          max_prompt_chars, strict_weights, warn_weight_above)
        self.max_windows = check_max_windows(max_windows)
        self._cache = LRUCache(cache_size)  # unit text -> token ids
        self._splits_at_spaces = (self._backend is not None and self.tokens_start == 1 and has_end_token
                                  and end_token is None and is_clip_pipeline(self._backend))
        self._embeddings = (EmbeddingLoader(embedding_directory, embedding_size, embed_key=embedding_key,
                                            any_width=embedding_any_width)
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

    def minimum_max_length(self) -> int:
        """The shortest window that packing can fill: a group shorter than ``max_word_length``
        moves whole to the next window, so an empty window must hold ``max_word_length - 1``
        tokens besides the start and end tokens (a shorter one would move it forever)."""
        return self.max_word_length - 1 + (self.start_token is not None) + (self.end_token is not None)

    def _check_max_length(self) -> None:
        length, minimum = self.max_length, self.minimum_max_length()
        if isinstance(length, bool) or not isinstance(length, int) or length < minimum:
            raise ConfigError(f"max_length must be an int of at least {minimum} ({self.max_word_length - 1} "
                              "tokens for the longest group packing never splits, plus the window's start and "
                              f"end tokens), got {length!r}")

    @functools.cached_property
    def inv_vocab(self) -> dict[int, str]:
        """Token id -> vocabulary text (ComfyUI's ``inv_vocab``), built when first used:
        a CLIP vocabulary's 49,408 entries cost 50 ms of every load otherwise."""
        return {v: k for k, v in self._vocab().items()}

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

    @property
    def splits_at_spaces(self) -> bool:
        """Whether :meth:`encode_units` cuts text at ASCII spaces and caches words (a CLIP
        pipeline): then a long text may be tokenized in pieces cut after spaces."""
        return self._splits_at_spaces

    def encode_units(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text unit, without start/end tokens (ComfyUI's slice).

        With a CLIP pipeline, units are split at ASCII spaces and words are
        cached: CLIP's normaliser and split regex never join text across a
        space, so the concatenation equals tokenizing the whole unit.

        >>> Vocabulary().encode_units(["a cat", ""])
        [[320, 2368], []]
        """
        if not self._splits_at_spaces:
            return self._encode_cached(list(texts), special=True)
        words = [text.split(" ") for text in texts]  # empty words (double spaces) have no tokens
        unique = dict.fromkeys(chain.from_iterable(words))  # each word looked up once
        unique.pop("", None)
        table = dict(zip(unique, self._encode_cached(list(unique), special=False)))
        table[""] = []
        ids_of = table.__getitem__
        return [list(chain.from_iterable(map(ids_of, unit))) for unit in words]

    def _encode_cached(self, texts: list[str], *, special: bool) -> list[list[int]]:
        out = self._cache.get_many(texts)
        if None not in out:  # all cached (ids are lists, never None)
            return out
        missing = sorted({t for t, ids in zip(texts, out) if ids is None})
        if special:
            stop = -1 if self.tokenizer_adds_end_token else None
            fresh = dict(zip(missing, (ids[self.tokens_start:stop] for ids in self._raw_encode(missing))))
        else:
            fresh = dict(zip(missing, self._raw_encode(missing, special=False)))
        self._cache.put_many(fresh)
        return [ids if ids is not None else fresh[t] for t, ids in zip(texts, out)]

    def token_text(self, token: Any) -> str:
        """The vocabulary text of ``token``: ``"<unknown>"`` for an id not in the
        vocabulary, ``"<embedding>"`` for an embedding vector (a tensor).

        >>> Vocabulary().token_text(2368)
        'cat</w>'
        """
        return self.inv_vocab.get(token, "<unknown>") if isinstance(token, int) else "<embedding>"

    def window_capacity(self) -> int:
        """Prompt tokens one window holds: ``max_length`` less the start and end tokens."""
        specials = (self.start_token is not None) + (self.end_token is not None)
        return max(1, self.max_length - specials)

    @property
    def embedding_loader(self) -> EmbeddingLoader | None:
        """The loader of this tokenizer's embedding folders; None when no folder was given."""
        return self._embeddings

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

    def parse_options_for(self, call_options: Mapping[str, Any]) -> ParseOptions:
        """The tokenizer's parse options, overridden (never mutated) by a call's keywords
        (those of :data:`PER_CALL_PARSE_OPTIONS` that ``call_options`` holds)."""
        overrides = {k: call_options[k] for k in PER_CALL_PARSE_OPTIONS if k in call_options}
        return dataclasses.replace(self.parse_options, **overrides) if overrides else self.parse_options

    def max_windows_for(self, call_options: Mapping[str, Any]) -> int | None:
        """The call's ``max_windows`` when it gives one, else the tokenizer's.

        Raises:
            PromptError: a ``max_windows`` that is neither None nor an int >= 1.
        """
        if "max_windows" in call_options:
            return check_max_windows(call_options["max_windows"])
        return self.max_windows
