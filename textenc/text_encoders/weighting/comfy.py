"""ComfyUI's weighting (``weight_mode="comfy"``, the default).

Every token whose weight ``w`` is not 1 becomes ``z_empty + (z - z_empty)·w``,
``z_empty`` being the empty prompt's encoding at the same position (ComfyUI's
``ClipTokenWeightEncoder.encode_token_weights``, ``comfy/sd1_clip.py``).
"""

from __future__ import annotations

import torch

from .mode import PerWindowWeighting

__all__ = ["ComfyWeighting", "COMFY"]


class ComfyWeighting(PerWindowWeighting):
    """``z_empty + (z - z_empty)·w`` per token; tokens of weight 1 keep ``z`` bit for bit."""

    name = "comfy"
    empty_alongside = True  # ComfyUI encodes the empty prompt in the weighted windows' batch

    def apply(self, z: torch.Tensor, weights: torch.Tensor, z_empty: torch.Tensor | None) -> torch.Tensor:
        w = weights.to(z.dtype).unsqueeze(-1)
        changed = w != 1.0
        weighted = z_empty + (z - z_empty) * w
        # Tokens of weight 1 keep z bit-for-bit, as ComfyUI skips them.
        return torch.where(changed, weighted, z)


COMFY = ComfyWeighting()
