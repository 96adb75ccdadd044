"""Encode the prompts of one SD3, Flux or Wan pipeline call to one shared shape.

Part of :mod:`textenc.diffusers` (used by :func:`textenc.diffusers.encode_for_pipeline`).
A pipeline takes its prompts and negatives as one tensor, so every prompt of a call gets
the same length:

* T5: every prompt's T5 tokens are padded to the call's longest T5 sequence (at least
  ``max_sequence_length`` when given) *before* encoding, as the pipeline itself pads every
  prompt to ``max_sequence_length`` before encoding. For prompts of the family's minimum
  length (SD3 77, Flux 256, Wan 512) that is ComfyUI's encoding of each prompt alone;
  beside a longer prompt, SD3's and Flux's unmasked T5 rows of a shorter one change as its
  padding grows (Wan's masked rows do not). ComfyUI, which samples conds of different
  lengths separately, has no such step.
* SD3's CLIP rows: a prompt with fewer 77-token windows than another gets whole windows of
  the empty prompt's CLIP encoding after its own, as for SDXL.
* SD3 with ``syntax="a1111"``: A1111 fits T5 to the prompt's own CLIP rows, so each prompt is
  encoded alone, and a shorter cond gets the empty prompt's whole cond (154 rows) appended
  until the lengths match, as A1111's ``pad_cond`` does (its setting "pad prompt/negative
  prompt to be same length", ``modules/sd_samplers_cfg_denoiser.py``).
  ``max_sequence_length`` has no A1111 meaning there and is refused.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..errors import TextencError
from ..text_encoders.a1111_families import is_sd3_a1111
from ..text_encoders.sequences import sequence_length, t5_role, with_min_length

__all__ = ["encode_sequences"]


def _t5_rows(clip: Any, tokens: Mapping[str, list]) -> int:
    role = t5_role(clip.family)
    if role is None or role.name not in clip.cond_stage_model.encoders:
        return 0
    return sequence_length(tokens[role.name])


def _empty_clip_window(clip: Any, options: Mapping[str, Any]) -> torch.Tensor:
    """The empty prompt's CLIP rows (SD3: 77 rows of L ‖ G padded to T5's width)."""
    empty_tokens = clip.cond_stage_model.empty_tokens()
    empty = clip.encode_from_tokens(empty_tokens, options=options)[0]
    return empty[:empty.shape[0] - _t5_rows(clip, empty_tokens)]


def _with_clip_windows(cond: torch.Tensor, clip_rows: int, most: int, empty: torch.Tensor) -> torch.Tensor:
    """(1, clip_rows + T, D) → (1, most + T, D): empty CLIP windows after the prompt's own."""
    if clip_rows == most:
        return cond
    windows = (most - clip_rows) // empty.shape[0]
    filler = empty.unsqueeze(0).to(cond).repeat(1, windows, 1)
    return torch.cat([cond[:, :clip_rows], filler, cond[:, clip_rows:]], dim=1)


def encode_sequences(clip: Any, tokens: Sequence[Mapping[str, list]], options: Mapping[str, Any], *,
                     max_sequence_length: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each prompt's ``(cond (1, T, D), pooled (1, P) or None)``, every cond of one length.

    Args:
        clip: a CLIP of a family with a T5 role.
        tokens: each prompt's tokens, as ``clip.tokenize`` gives them.
        max_sequence_length: pad T5 to at least this many tokens (a diffusers pipeline's
            ``max_sequence_length``: SD3 256, Flux 512, Wan 512); None: the family's minimum.
    """
    if any(is_sd3_a1111(t) for t in tokens):
        return _a1111_sd3(clip, tokens, options, max_sequence_length)
    longest = max(_t5_rows(clip, t) for t in tokens)
    longest = max(longest, max_sequence_length or 0)
    padded = [with_min_length(clip.family, t, longest or None) for t in tokens]
    encoded = [clip.encode_from_tokens(t, return_pooled=True, options=options) for t in padded]
    clip_rows = [cond.shape[1] - _t5_rows(clip, t) for (cond, _), t in zip(encoded, padded)]
    most = max(clip_rows)
    if min(clip_rows) == most:
        return encoded
    empty = _empty_clip_window(clip, options)
    return [(_with_clip_windows(cond, rows, most, empty), pooled)
            for (cond, pooled), rows in zip(encoded, clip_rows)]


def _a1111_sd3(clip: Any, tokens: Sequence[Mapping[str, list]], options: Mapping[str, Any],
               max_sequence_length: int | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """SD3 with ``syntax="a1111"``: each prompt alone, shorter conds padded with the empty
    prompt's cond (A1111's ``pad_cond``)."""
    if max_sequence_length is not None:
        raise TextencError(f"max_sequence_length={max_sequence_length!r}: with syntax='a1111' SD3's T5 has as "
                           "many rows as its CLIP part, as A1111 encodes it; leave max_sequence_length out")
    encoded = [clip.encode_from_tokens(t, return_pooled=True, options=options) for t in tokens]
    most = max(cond.shape[1] for cond, _ in encoded)
    if all(cond.shape[1] == most for cond, _ in encoded):
        return encoded
    empty = clip.encode_from_tokens(clip.tokenize("", syntax="a1111"), options=options)
    return [(torch.cat([cond] + [empty.to(cond)] * ((most - cond.shape[1]) // empty.shape[1]), dim=1), pooled)
            for cond, pooled in encoded]
