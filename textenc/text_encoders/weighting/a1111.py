"""AUTOMATIC1111's emphasis: ``weight_mode="a1111"``, ``"a1111_no_norm"`` and ``"none"``.

The rules (facts from A1111's ``modules/sd_hijack_clip.py`` ``process_tokens``
and its emphasis settings, ``modules/sd_emphasis.py``):

* ``a1111`` (emphasis "Original"): ``z·w``, then rescaled so the mean of the
  encoding equals the unweighted mean;
* ``a1111_no_norm`` (emphasis "No norm"): ``z·w`` only;
* ``none`` (emphasis "None"): weights are ignored.

For one prompt, the mean is taken per window (:meth:`A1111Emphasis.apply`).
A1111 encodes the texts of one prompt schedule in one batch and takes the mean
per chunk index over all of them (:meth:`A1111Emphasis.apply_over_texts`, used
by :mod:`textenc.text_encoders.schedules`).
"""

from __future__ import annotations

import torch

from .mode import PerWindowWeighting

__all__ = ["A1111Emphasis", "A1111_ORIGINAL", "A1111_NO_NORM", "NO_EMPHASIS"]


def _restore_mean(z: torch.Tensor, scaled: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``scaled`` rescaled so its mean over ``dims`` is ``z``'s again."""
    original_mean = z.mean(dim=dims, keepdim=True)
    new_mean = scaled.mean(dim=dims, keepdim=True)
    # A window whose mean is exactly 0 (a final layer norm without bias gives
    # zero-mean tokens) would divide 0 by 0; there is no mean to restore then.
    ratio = torch.where(new_mean == 0, torch.ones_like(new_mean), original_mean / new_mean)
    return scaled * ratio


class A1111Emphasis(PerWindowWeighting):
    """One of A1111's emphasis settings.

    Args:
        name: the ``weight_mode``.
        scale: multiply the encoding by the weights (False: "None", weights ignored).
        restore_mean: then restore the encoding's mean ("Original").
    """

    def __init__(self, name: str, *, scale: bool, restore_mean: bool) -> None:
        self.name = name
        self.uses_weights = scale
        self.restore_mean = restore_mean

    def apply(self, z: torch.Tensor, weights: torch.Tensor, z_empty: torch.Tensor | None = None) -> torch.Tensor:
        """``z`` (W, T, D) emphasised by ``weights`` (W, T), the mean restored per window."""
        if not self.uses_weights:
            return z
        scaled = z * weights.to(z.dtype).unsqueeze(-1)
        return _restore_mean(z, scaled, (1, 2)) if self.restore_mean else scaled

    def apply_over_texts(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``z`` (texts, chunks, T, D) emphasised by ``weights`` (texts, chunks, T), the mean
        restored per chunk index over all texts (A1111's batch of one prompt schedule)."""
        if not self.uses_weights or not bool((weights != 1.0).any()):
            return z
        scaled = z * weights.to(z.dtype).unsqueeze(-1)
        return _restore_mean(z, scaled, (0, 2, 3)) if self.restore_mean else scaled


A1111_ORIGINAL = A1111Emphasis("a1111", scale=True, restore_mean=True)
A1111_NO_NORM = A1111Emphasis("a1111_no_norm", scale=True, restore_mean=False)
NO_EMPHASIS = A1111Emphasis("none", scale=False, restore_mean=False)
