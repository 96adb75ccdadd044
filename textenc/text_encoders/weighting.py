"""Prompt-weight interpretation: how token weights change an encoding.

All functions work on whole tensors (no per-token Python loop).

Modes (``weight_mode``):

* ``comfy`` (default, ComfyUI): ``z_empty + (z - z_empty) * w`` for every token
  whose weight is not 1, where ``z_empty`` is the encoding of the empty prompt
  at the same position.
* ``a1111`` (AUTOMATIC1111): ``z * w``, then the window is rescaled so its
  mean equals the unweighted window's mean.
* ``a1111_no_norm``: ``z * w`` only.
* ``compel``: compel's algorithm (:mod:`textenc.text_encoders.compel_weighting`):
  every weighted token as ``comfy``, then each fragment weighted below 1 is
  blended with an encode that masks it out. Only its first step is here
  (:func:`apply_weights` treats ``compel`` as ``comfy``); the encoder runs the rest.
* ``none``: weights are ignored.

Token normalisation (``normalization``), applied to the weights before the
mode, per unit (word id), as in the ComfyUI "advanced CLIP encode" nodes:
``none``; ``length`` — a unit of n tokens gets ``1 + sign(w-1)·|w-1|/√n``;
``mean`` — all non-special weights shifted so their mean is 1;
``length+mean`` — both, in that order.
"""

from __future__ import annotations

import torch

from ..errors import PromptError

__all__ = ["WEIGHT_MODES", "NORMALIZATIONS", "normalize_weights", "apply_weights"]

WEIGHT_MODES = ("comfy", "a1111", "a1111_no_norm", "compel", "none")
NORMALIZATIONS = ("none", "mean", "length", "length+mean")


def check_mode(weight_mode: str, normalization: str) -> None:
    if weight_mode not in WEIGHT_MODES:
        raise PromptError(f"unknown weight_mode {weight_mode!r}; choose one of {WEIGHT_MODES}")
    if normalization not in NORMALIZATIONS:
        raise PromptError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")


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


def apply_weights(z: torch.Tensor, weights: torch.Tensor, z_empty: torch.Tensor | None,
                  weight_mode: str) -> torch.Tensor:
    """Apply ``weights`` (windows, T) to encodings ``z`` (windows, T, D).

    ``z_empty`` (T, D) is needed by ``comfy`` and ``compel``. For ``compel`` this
    is only the first step (every weight, down-weights included, as ``comfy``);
    its down-weights also need extra encodes, which the encoder runs.
    """
    w = weights.to(z.dtype).unsqueeze(-1)
    if weight_mode == "none":
        return z
    if weight_mode in ("comfy", "compel"):
        changed = w != 1.0
        weighted = z_empty + (z - z_empty) * w
        # Tokens of weight 1 keep z bit-for-bit, as ComfyUI skips them.
        return torch.where(changed, weighted, z)
    scaled = z * w
    if weight_mode == "a1111_no_norm":
        return scaled
    # a1111: restore each window's original mean (A1111's prompt_parser/sd_hijack).
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    new_mean = scaled.mean(dim=(1, 2), keepdim=True)
    # A window whose mean is exactly 0 (a final layer norm without bias gives
    # zero-mean tokens) would divide 0 by 0; there is no mean to restore then.
    ratio = torch.where(new_mean == 0, torch.ones_like(new_mean), original_mean / new_mean)
    return scaled * ratio
