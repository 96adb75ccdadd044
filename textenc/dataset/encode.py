"""Batched caption encoding for :mod:`textenc.dataset`.

Captions with the same number of windows are encoded together through the
CLIP's public batched encode (:meth:`textenc.sd.CLIP.encode_batch`, see
:mod:`textenc.text_encoders.batch`): one forward of each text encoder, each
caption's result bit for bit equal to a direct ``CLIP.encode_from_tokens`` of it
alone (``tests/test_dataset_batching.py`` checks it at 1 and 2 threads).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import torch

from ..errors import PromptError
from ..text_encoders.clip_skip import layer_from_clip_skip
from ..text_encoders.sequences import real_length, with_min_length
from .compute import torch_dtype
from .layout import Layout, Row, layout_for

__all__ = ["EncodeSettings", "Tokenized", "CaptionEncoder", "Row", "OUTPUT_DTYPES", "layer_for_clip_skip",
           "resolved_layers"]

OUTPUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    """What changes the encoding of one caption (all recorded in the manifest)."""

    layer: int | None = None  # ComfyUI's layer index for every encoder; None: the kind's default
    syntax: str = "comfy"
    truncate_long_prompts: bool | None = None  # compel's option; None: the syntax has none
    weight_mode: str = "comfy"
    outputs: str = "cond,pooled"
    dtype: str = "fp16"
    compute_dtype: str = "fp32"
    max_chars: int = 16384
    max_windows: int = 64
    normalization: str = "none"  # textenc's --normalization; word ids are tokenized only for another value
    embeddings: str | None = None  # textual-inversion folder (absolute) for embedding:name
    t5_min_length: int | None = None  # pad T5 to at least this many tokens; None: the family's minimum
    fast_pooled: bool = False  # pooled from the pooled row's tail only (not ComfyUI's bits; see ClipOptions)

    def clip_options(self) -> dict[str, Any]:
        """The ``options`` of ``CLIP.encode_from_tokens`` for these settings."""
        options: dict[str, Any] = {"weight_mode": self.weight_mode,
                                   "compute_dtype": torch_dtype(self.compute_dtype)}
        if self.layer is not None:
            options["layer"] = self.layer
        if self.normalization != "none":
            options["normalization"] = self.normalization
        if self.fast_pooled:
            options["fast_pooled"] = True
        return options

    def tokenize_kwargs(self) -> dict[str, Any]:
        """The keywords of ``CLIP.tokenize`` for these settings: the syntax and its own options."""
        kwargs: dict[str, Any] = {"syntax": self.syntax}
        if self.truncate_long_prompts is not None:
            kwargs["truncate_long_prompts"] = self.truncate_long_prompts
        if self.normalization != "none":
            kwargs["return_word_ids"] = True  # normalization groups tokens by word
        return kwargs

    @property
    def want_cond(self) -> bool:
        return self.outputs != "pooled"


@dataclasses.dataclass
class Tokenized:
    """One row after tokenizing: its tokens and window count, or why it is rejected."""

    row: int
    tokens: Mapping[str, list] | None
    windows: int = 0
    reason: str | None = None

    @property
    def group_key(self) -> tuple[int, ...]:
        return tuple(len(self.tokens[k]) for k in sorted(self.tokens))


def _layer_key(options, encoder) -> tuple:
    """What an encoder's resolved options mean for the layer, as an index into its loaded
    layers: the normalized last hidden state is the same as ``"last"``, however it was asked for."""
    depth = encoder.num_layers
    if options.layer != "hidden":
        return ("last",) if options.layer == "last" else (options.layer,)
    index = encoder.numbering.model_index(options.layer_idx) % depth
    if options.layer_norm_hidden_state and index == depth - 1:
        return ("last",)
    return (options.layer, index, options.layer_norm_hidden_state)


def layer_for_clip_skip(clip, clip_skip: int | None) -> int | None:
    """A1111's clip skip (1 = last layer, 2 = penultimate; ComfyUI's -1/-2 too) → ComfyUI's
    layer index for every encoder of ``clip``, or None where it is the kind's default layer
    (so giving the default explicitly is the same run as leaving it out). Diffusers' 23-layer
    SD2 counts as ViT-H's 24 layers, as everywhere (:class:`textenc.text_encoders.clip_skip.LayerNumbering`).

    Raises:
        LayerError: not an integer, 0, or a layer an encoder does not have (names value and range).
    """
    if clip_skip is None:
        return None
    layer = layer_from_clip_skip(clip_skip, clip.numbered_layers, numbering="a1111")
    encoders = clip.cond_stage_model.encoders
    same = all(_layer_key(enc.resolve_options({"layer": layer}), enc)
               == _layer_key(enc.resolve_options({}), enc) for enc in encoders.values())
    return None if same else layer


def resolved_layers(clip, layer: int | None) -> dict[str, int]:
    """The layer each encoder uses, as ComfyUI's negative index (-1 = last; diffusers'
    23-layer SD2 counts as ViT-H's 24, so its last layer is -2), for the manifest."""
    result = {}
    for role, encoder in clip.cond_stage_model.encoders.items():
        options = encoder.resolve_options({} if layer is None else {"layer": layer})
        index = encoder.numbering.numbered_index(-1) if options.layer == "last" else options.layer_idx
        result[role] = index - encoder.numbered_layers if index >= 0 else index
    return result


class CaptionEncoder:
    """Tokenize and encode captions with one :class:`textenc.sd.CLIP` and fixed settings.

    Not thread-safe for encoding; :meth:`tokenize` may run in another thread
    than :meth:`encode_batch` (the tokenizer and the model share no state).
    """

    def __init__(self, clip, settings: EncodeSettings) -> None:
        self.clip = clip
        self.settings = settings
        self.out_dtype = OUTPUT_DTYPES[settings.dtype]
        self.options = settings.clip_options()
        self.seconds = {"tokenize": 0.0, "forward": 0.0, "write": 0.0}
        self.empty_tokens = self._tokens("")
        cond, pooled = clip.encode_from_tokens(self.empty_tokens, return_pooled=True, options=self.options)
        self.empty = (cond[0], None if pooled is None else pooled[0])
        self.layout: Layout = layout_for(clip, self.empty[0], self.empty[1], self.empty_tokens)

    def _tokens(self, text: str) -> dict:
        """``clip.tokenize(text)`` with the settings' syntax, T5 padded to ``t5_min_length``."""
        tokens = self.clip.tokenize(text, **self.settings.tokenize_kwargs())
        return with_min_length(self.clip.family, tokens, self.settings.t5_min_length)

    # ---- tokenizing ----------------------------------------------------------
    def tokenize(self, row: int, text: str | None, reason: str | None = None) -> Tokenized:
        """Tokenize one caption; a bad caption becomes a rejected :class:`Tokenized`."""
        if text is None:
            return Tokenized(row, None, reason=reason or "no caption")
        if len(text) > self.settings.max_chars:
            return Tokenized(row, None, reason=f"caption has {len(text)} characters, more than "
                                               f"max_chars={self.settings.max_chars}")
        start = time.perf_counter()
        try:
            tokens = self._tokens(text)
        except PromptError as exc:
            return Tokenized(row, None, reason=f"PromptError: {exc}")
        finally:
            self.seconds["tokenize"] += time.perf_counter() - start
        windows = self._windows(tokens)
        if windows > self.settings.max_windows:
            return Tokenized(row, None, reason=f"caption needs {windows} windows, more than "
                                               f"max_windows={self.settings.max_windows}")
        return Tokenized(row, tokens, windows)

    def _windows(self, tokens: Mapping[str, list]) -> int:
        """The caption's 77-token windows: CLIP's, and a T5 sequence's real tokens counted in
        77s (so ``max_windows`` bounds T5's attention too, which grows with its square)."""
        t5 = self.layout.t5_role
        counts = [len(w) for role, w in tokens.items() if role != t5]
        if t5 is not None and t5 in tokens:
            counts.append(-(-real_length(tokens[t5][0]) // self.layout.window_length))
        return max(counts, default=0)

    # ---- encoding ------------------------------------------------------------
    def encode_batch(self, items: Sequence[Tokenized]) -> dict[int, Any]:
        """Encode captions sharing a window count → ``{row: Row}`` (:class:`~textenc.dataset.layout.Row`),
        or ``{row: reason}`` (a str) for a caption that failed to encode."""
        start = time.perf_counter()
        try:
            return self._batched(items)
        finally:
            self.seconds["forward"] += time.perf_counter() - start

    def _batched(self, items: Sequence[Tokenized]) -> dict[int, Any]:
        encoded = self.clip.encode_batch([item.tokens for item in items], options=self.options, errors="return")
        return {item.row: f"PromptError: {result}" if isinstance(result, PromptError)
                else self.layout.row(result[0][0], None if result[1] is None else result[1][0], item.tokens,
                                     self.out_dtype, want_cond=self.settings.want_cond)
                for item, result in zip(items, encoded)}

    def encode_empty(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The empty caption's ComfyUI ``(cond [T, D], pooled [P] or None)`` in the stored dtype
        (for caption dropout)."""
        cond, pooled = self.empty
        return cond.to(self.out_dtype), None if pooled is None else pooled.to(self.out_dtype)
