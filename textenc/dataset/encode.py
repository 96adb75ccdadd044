"""Batched caption encoding for :mod:`textenc.dataset`.

Captions with the same number of windows are encoded together: their windows
are stacked into one forward of each ``SDClipModel``, for the last layer and
for an intermediate one (clip skip, the SD2 and SDXL defaults) alike; weighting
is then applied per caption exactly as :func:`textenc.text_encoders.encode.encode_token_weights`
does. Against a direct ``CLIP.encode_from_tokens`` of each caption alone the
result is bit for bit equal, for the last layer and an intermediate one alike:
the pooled row of an intermediate layer runs the remaining layers as a
[windows, 1, D] slice per caption (``row_groups``), because matmul kernels round
a 1-2 row product differently from a larger one
(``tests/test_dataset_batching.py`` checks it at 1 and 2 threads). Captions whose weighting needs
extra encodes (compel down-weights) or whose SDXL sides have different window
counts take the direct call.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import torch

from ..errors import PromptError
from ..text_encoders.clip_skip import layer_from_clip_skip
from ..text_encoders.encode import empty_encoding, encode_windows, token_weights
from ..text_encoders.weighting import apply_weights
from .compute import torch_dtype

__all__ = ["EncodeSettings", "Tokenized", "CaptionEncoder", "OUTPUT_DTYPES", "layer_for_clip_skip",
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

    def clip_options(self) -> dict[str, Any]:
        """The ``options`` of ``CLIP.encode_from_tokens`` for these settings."""
        options: dict[str, Any] = {"weight_mode": self.weight_mode,
                                   "compute_dtype": torch_dtype(self.compute_dtype)}
        if self.layer is not None:
            options["layer"] = self.layer
        if self.normalization != "none":
            options["normalization"] = self.normalization
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


def _encoders(clip) -> dict[str, Any]:
    model = clip.cond_stage_model
    if clip.clip_type == "sdxl":
        return {"g": model.clip_g, "l": model.clip_l}
    return {model.clip_name: model.encoder}


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
    encoders = _encoders(clip)
    same = all(_layer_key(enc.resolve_options({"layer": layer}), enc)
               == _layer_key(enc.resolve_options({}), enc) for enc in encoders.values())
    return None if same else layer


def resolved_layers(clip, layer: int | None) -> dict[str, int]:
    """The layer each encoder uses, as ComfyUI's negative index (-1 = last; diffusers'
    23-layer SD2 counts as ViT-H's 24, so its last layer is -2), for the manifest."""
    result = {}
    for role, encoder in _encoders(clip).items():
        options = encoder.resolve_options({} if layer is None else {"layer": layer})
        index = encoder.numbering.numbered_index(-1) if options.layer == "last" else options.layer_idx
        result[role] = index - encoder.numbered_layers if index >= 0 else index
    return result


def _has_compel_tags(windows: list) -> bool:
    """Whether compel-syntax tokens carry fragment tags (``.compel``, see
    :mod:`textenc.prompts.dialects.compel.tokens`) that only the direct encode applies."""
    return any(getattr(pair, "compel", None) is not None for window in windows for pair in window)


class CaptionEncoder:
    """Tokenize and encode captions with one :class:`textenc.sd.CLIP` and fixed settings.

    Not thread-safe for encoding; :meth:`tokenize` may run in another thread
    than :meth:`encode_batch` (the tokenizer and the model share no state).
    """

    def __init__(self, clip, settings: EncodeSettings) -> None:
        self.clip = clip
        self.settings = settings
        self.out_dtype = OUTPUT_DTYPES[settings.dtype]
        self.encoders = _encoders(clip)
        self.options = settings.clip_options()
        self.resolved = {role: enc.resolve_options(self.options) for role, enc in self.encoders.items()}
        self.window_length = next(iter(self.encoders.values())).max_length
        self.seconds = {"tokenize": 0.0, "forward": 0.0, "write": 0.0}

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
            tokens = self.clip.tokenize(text, **self.settings.tokenize_kwargs())
        except PromptError as exc:
            return Tokenized(row, None, reason=f"PromptError: {exc}")
        finally:
            self.seconds["tokenize"] += time.perf_counter() - start
        windows = max(len(w) for w in tokens.values())
        if windows > self.settings.max_windows:
            return Tokenized(row, None, reason=f"caption needs {windows} windows, more than "
                                               f"max_windows={self.settings.max_windows}")
        return Tokenized(row, tokens, windows)

    # ---- encoding ------------------------------------------------------------
    def encode_batch(self, items: Sequence[Tokenized]) -> dict[int, Any]:
        """Encode captions sharing a window count → ``{row: (cond [T, D] or None, pooled [P], windows)}``,
        or ``{row: reason}`` (a str) for a caption that failed to encode."""
        start = time.perf_counter()
        try:
            return self._batched(items)
        finally:
            self.seconds["forward"] += time.perf_counter() - start

    def _finish(self, cond: torch.Tensor, pooled: torch.Tensor):
        """``(cond [T, D] in the output dtype or None, pooled [P], windows)``."""
        cond_out = cond.to(self.out_dtype) if self.settings.want_cond else None
        return cond_out, pooled.to(self.out_dtype), cond.shape[0] // self.window_length

    def _direct(self, item: Tokenized):
        try:
            cond, pooled = self.clip.encode_from_tokens(item.tokens, return_pooled=True,
                                                        options=self.options)
        except PromptError as exc:
            return f"PromptError: {exc}"
        return self._finish(cond[0], pooled[0])

    def _batched(self, items: Sequence[Tokenized]) -> dict[int, Any]:
        per_role = {}
        for role, encoder in self.encoders.items():
            windows = [[p[0] for p in window] for item in items for window in item.tokens[role]]
            # Each caption's pooled tail with its own shapes: bit-equal to encoding it alone.
            groups = [len(item.tokens[role]) for item in items]
            z, pooled = encode_windows(encoder, windows, self.resolved[role], row_groups=groups)[:2]
            per_role[role] = (z, pooled, len(items[0].tokens[role]))
        results: dict[int, Any] = {}
        for index, item in enumerate(items):
            results[item.row] = self._one(item, index, per_role)
        return results

    def _one(self, item: Tokenized, index: int, per_role: Mapping[str, tuple]):
        outs = {}
        for role, (z, pooled, count) in per_role.items():
            z_caption = z[index * count:(index + 1) * count]
            weighted = self._weighted(role, item.tokens[role], z_caption)
            if weighted is None or isinstance(weighted, str):
                return weighted if isinstance(weighted, str) else self._direct(item)
            outs[role] = (weighted.reshape(-1, weighted.shape[-1]), pooled[index * count])
        if self.clip.clip_type != "sdxl":
            return self._finish(*next(iter(outs.values())))
        if outs["g"][0].shape[0] != outs["l"][0].shape[0]:
            return self._direct(item)  # SDXL pads the shorter side: rare, keep ComfyUI's path
        return self._finish(torch.cat([outs["l"][0], outs["g"][0]], dim=-1), outs["g"][1])

    def _weighted(self, role: str, windows: list, z: torch.Tensor):
        """``z`` weighted as encode_token_weights does; None → use the direct path."""
        opts = self.resolved[role]
        try:
            weights, _ = token_weights(windows, opts.normalization)
        except PromptError as exc:
            return f"PromptError: {exc}"
        if opts.weight_mode == "compel" and (bool((weights < 1.0).any()) or _has_compel_tags(windows)):
            return None  # down-weights, .blend() and .and() need compel's extra encodes
        if opts.weight_mode == "none" or not bool((weights != 1.0).any()):
            return z
        z_empty = empty_encoding(self.encoders[role], z.shape[1], opts)[0]
        return apply_weights(z, weights.to(z.device), z_empty, opts.weight_mode)

    def encode_empty(self):
        """The empty caption's ``(cond [77, D], pooled [P])`` (for caption dropout)."""
        tokens = self.clip.tokenize("", **self.settings.tokenize_kwargs())
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True, options=self.options)
        return cond[0].to(self.out_dtype), pooled[0].to(self.out_dtype)
