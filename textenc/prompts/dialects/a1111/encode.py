"""Encoding an A1111 prompt schedule as A1111 does: all texts of one schedule in one batch.

A1111 encodes the texts of one prompt's schedule (one per change of the
prompt) together, chunk by chunk (``sd_hijack_clip.forward``): a text with
fewer chunks gets empty chunks (``[start, end, pad...]``, weight 1), so all
of them have the same length, and its "Original" emphasis restores the mean
over that whole batch of chunks (``process_tokens``). With one text (no
editing) this is the per-window mean of ``weight_mode="a1111"``. Modes other
than ``a1111``, ``a1111_no_norm`` and ``none`` encode each text on its own.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from ....text_encoders.encode import encode_windows, token_weights

__all__ = ["encode_texts", "model_encoders"]

BATCH_MODES = ("a1111", "a1111_no_norm", "none")


def model_encoders(model: Any) -> dict[str, Any]:
    """The ``SDClipModel`` of each token key (``{"l": ...}``, or ``{"l", "g"}`` for SDXL)."""
    return dict(model.encoders)  # the family wrapper holds its encoders by role


def _empty_window(encoder: Any) -> list[tuple]:
    tokens = encoder.gen_empty_tokens(encoder.special_tokens, encoder.max_length)
    return [(t, 1.0, 0) for t in tokens]


def _emphasis(z: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    """A1111's emphasis on ``z`` (texts, chunks, T, D): the mean per chunk index over all texts."""
    if mode == "none" or not bool((weights != 1.0).any()):
        return z
    scaled = z * weights.to(z.dtype).unsqueeze(-1)
    if mode == "a1111_no_norm":
        return scaled
    original = z.mean(dim=(0, 2, 3), keepdim=True)
    new = scaled.mean(dim=(0, 2, 3), keepdim=True)
    ratio = torch.where(new == 0, torch.ones_like(new), original / new)  # see weighting.apply_weights
    return scaled * ratio


def _encode_side(encoder: Any, windows: list[list[list[tuple]]], order: Sequence[int],
                 options: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """One encoder: ``windows[u]`` of unique text ``u``; ``order`` lists the batch by unique index."""
    opts = encoder.resolve_options(options)
    chunks = len(windows[0])
    flat = [window for text in windows for window in text]
    z, pooled = encode_windows(encoder, [[p[0] for p in w] for w in flat], opts)[:2]
    weights, _ = token_weights(flat, opts.normalization)
    length, width = z.shape[1], z.shape[2]
    index = torch.as_tensor(list(order), device=z.device)
    z = z.reshape(len(windows), chunks, length, width)[index]
    weights = weights.reshape(len(windows), chunks, length)[index.cpu()]
    z = _emphasis(z, weights.to(z.device), opts.weight_mode)
    return z.reshape(len(order), chunks * length, width), pooled.reshape(len(windows), chunks, -1)[index, 0]


def _encode_each(encoder: Any, windows: list[list[list[tuple]]], order: Sequence[int],
                 options: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Modes without A1111's batch semantics: each text through ``encode_token_weights``."""
    outs = [encoder.encode_token_weights(text, options=options)[:2] for text in windows]
    conds = torch.cat([outs[u][0] for u in order])
    return conds, torch.cat([outs[u][1] for u in order])


def encode_texts(model: Any, tokenize: Callable[[str], dict], texts: Sequence[str],
                 options: Mapping[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(cond [1, 77·chunks, D], pooled [1, P])`` of each text, encoded as one A1111 batch.

    ``tokenize(text)`` returns ``{key: windows}`` with word ids (A1111 windows).
    """
    unique = list(dict.fromkeys(texts))
    order = [unique.index(t) for t in texts]
    tokens = [tokenize(text) for text in unique]
    encoders = model_encoders(model)
    chunks = max(len(windows) for per_text in tokens for windows in per_text.values())
    sides = {}
    for key, encoder in encoders.items():
        padded = [list(t[key]) + [_empty_window(encoder)] * (chunks - len(t[key])) for t in tokens]
        mode = encoder.resolve_options(options).weight_mode
        run = _encode_side if mode in BATCH_MODES else _encode_each
        sides[key] = run(encoder, padded, order, options)
    if len(sides) == 1:
        ((cond, pooled),) = sides.values()
    else:  # SDXL: L and G side by side, G's pooled output
        cond, pooled = torch.cat([sides["l"][0], sides["g"][0]], dim=-1), sides["g"][1]
    return [(cond[i:i + 1], pooled[i:i + 1]) for i in range(len(texts))]
