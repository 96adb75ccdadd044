"""Token weights read from weighted windows, and their normalisation.

Token normalisation (``normalization``), applied to the weights before the
weight mode, per unit (word id), as in the ComfyUI "advanced CLIP encode" nodes:
``none``; ``length`` — a unit of n tokens gets ``1 + sign(w-1)·|w-1|/√n``;
``mean`` — all non-special weights shifted so their mean is 1;
``length+mean`` — both, in that order. All functions work on whole tensors
(no per-token Python loop).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...errors import PromptError

__all__ = ["NORMALIZATIONS", "normalize_weights", "token_weights"]

NORMALIZATIONS = ("none", "mean", "length", "length+mean")


def normalize_weights(weights: torch.Tensor, word_ids: torch.Tensor | None,
                      normalization: str) -> torch.Tensor:
    """Normalise (windows, T) weights per unit; word id 0 marks special tokens."""
    if normalization == "none":
        return weights
    if word_ids is None:
        raise PromptError(f"normalization {normalization!r} needs word ids: tokenize with "
                          "return_word_ids=True")
    out = weights.clone()
    real = word_ids != 0
    if "length" in normalization and real.any():
        _, inverse, counts = torch.unique(word_ids[real], return_inverse=True, return_counts=True)
        deviation = out[real] - 1.0
        out[real] = 1.0 + torch.sign(deviation) * deviation.abs() / counts[inverse].double().sqrt().to(out.dtype)
    if "mean" in normalization and real.any():
        out[real] = out[real] + (1.0 - out[real].mean())
    return out


def token_weights(pairs: Sequence[Sequence[tuple]],
                  normalization: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalized (windows, T) float64 weights of ``(token, weight[, word_id])``
    windows, and their (windows, T) word ids (None when a pair has none).

    Raises:
        PromptError: a weight that is not a finite number (or a bad normalization).
    """
    weights = torch.tensor([[float(p[1]) for p in w] for w in pairs], dtype=torch.float64)
    word_ids = None
    if all(len(p) > 2 for w in pairs for p in w):
        word_ids = torch.tensor([[int(p[2]) for p in w] for w in pairs])
    weights = normalize_weights(weights, word_ids, normalization)
    if not torch.isfinite(weights).all():
        raise PromptError("token weights must be finite numbers")
    return weights, word_ids
