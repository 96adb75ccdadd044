"""Batched caption encoding for :mod:`textenc.dataset`.

Captions with the same number of windows are encoded together: their windows
are stacked into one forward of each ``SDClipModel``, for the last layer and
for an intermediate one (clip skip, the SD2 and SDXL defaults) alike; weighting
is then applied per caption exactly as :func:`textenc.sd1_encode.encode_token_weights`
does. Against a direct ``CLIP.encode_from_tokens`` of each caption alone the
result is bit for bit equal for the last layer and within 1e-6 (fp32) for an
intermediate one, whose pooled row runs the remaining layers on a [windows, 1, D]
slice that matmul kernels round differently with its size
(``tests/test_dataset_batching.py`` checks both). Captions whose weighting needs
extra encodes (compel down-weights) or whose SDXL sides have different window
counts take the direct call.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import torch

from ..errors import PromptError
from ..sd1_encode import empty_encoding, encode_windows, token_weights
from ..weighting import apply_weights
from .compute import torch_dtype

__all__ = ["EncodeSettings", "Tokenized", "CaptionEncoder", "OUTPUT_DTYPES"]

OUTPUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    """What changes the encoding of one caption (all recorded in the manifest)."""

    clip_skip: int | None = None
    weight_mode: str | None = None
    outputs: str = "cond,pooled"
    dtype: str = "fp16"
    compute_dtype: str = "fp32"
    max_chars: int = 16384
    max_windows: int = 64

    def clip_options(self) -> dict[str, Any]:
        """The ``options`` of ``CLIP.encode_from_tokens``; empty means the model's defaults."""
        options: dict[str, Any] = {}
        if self.clip_skip is not None:
            options["layer"] = -int(self.clip_skip)
        if self.weight_mode is not None:
            options["weight_mode"] = self.weight_mode
        options["compute_dtype"] = torch_dtype(self.compute_dtype)
        return options

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
            tokens = self.clip.tokenize(text)
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
            z, pooled = encode_windows(encoder, windows, self.resolved[role])[:2]
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
        if opts.weight_mode == "none" or not bool((weights != 1.0).any()):
            return z
        if opts.weight_mode == "compel" and bool((weights < 1.0).any()):
            return None
        z_empty = empty_encoding(self.encoders[role], z.shape[1], opts)[0]
        return apply_weights(z, weights.to(z.device), z_empty, opts.weight_mode)

    def encode_empty(self):
        """The empty caption's ``(cond [77, D], pooled [P])`` (for caption dropout)."""
        tokens = self.clip.tokenize("")
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True, options=self.options)
        return cond[0].to(self.out_dtype), pooled[0].to(self.out_dtype)
