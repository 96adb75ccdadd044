"""Encoding the texts of one prompt schedule together, as a dialect asks.

A dialect with prompt editing (:func:`textenc.prompts.dialects.prompt_schedules`)
names how the texts of one schedule are encoded in its ``schedule_encoding``:
None encodes each text on its own; another name is a routine of
:data:`SCHEDULE_ENCODINGS`, looked up here (:func:`schedule_encoder`), so that
prompts/ names the routine without importing the model code.

``"a1111"`` (:func:`encode_a1111_schedule`): A1111 encodes the texts of one
prompt's schedule (one per change of the prompt) together, chunk by chunk
(``sd_hijack_clip.forward``): a text with fewer chunks gets empty chunks
(``[start, end, pad...]``, weight 1), so all of them have the same length,
and its "Original" emphasis restores the mean over that whole batch of chunks
(``process_tokens``; :meth:`~textenc.text_encoders.weighting.A1111Emphasis.apply_over_texts`).
With one text (no editing) this is the per-window mean of
``weight_mode="a1111"``. Modes other than A1111's emphasis settings
(``a1111``, ``a1111_no_norm``, ``none``) encode each text on its own.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..errors import PromptError
from .encode import encode_windows
from .weighting import A1111Emphasis, get_weight_mode, token_weights

__all__ = ["SCHEDULE_ENCODINGS", "schedule_encoder", "encode_a1111_schedule", "model_encoders"]

#: ``encode(model, tokenize, texts, options)`` → ``[(cond (1, N, D), pooled (1, P)), ...]``, one per text.
ScheduleEncoder = Callable[[Any, Callable[[str], dict], Sequence[str], Mapping[str, Any]], list]


def model_encoders(model: Any) -> dict[str, Any]:
    """The ``SDClipModel`` of each token key (``{"l": ...}``, or ``{"l", "g"}`` for SDXL)."""
    return dict(model.encoders)  # the family wrapper holds its encoders by role


def _empty_window(encoder: Any) -> list[tuple]:
    tokens = encoder.gen_empty_tokens(encoder.special_tokens, encoder.max_length)
    return [(t, 1.0, 0) for t in tokens]


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
    z = get_weight_mode(opts.weight_mode).apply_over_texts(z, weights.to(z.device))
    return z.reshape(len(order), chunks * length, width), pooled.reshape(len(windows), chunks, -1)[index, 0]


def _encode_each(encoder: Any, windows: list[list[list[tuple]]], order: Sequence[int],
                 options: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Modes without A1111's batch semantics: each text through ``encode_token_weights``."""
    outs = [encoder.encode_token_weights(text, options=options)[:2] for text in windows]
    conds = torch.cat([outs[u][0] for u in order])
    return conds, torch.cat([outs[u][1] for u in order])


def encode_a1111_schedule(model: Any, tokenize: Callable[[str], dict], texts: Sequence[str],
                          options: Mapping[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(cond [1, 77·chunks, D], pooled [1, P])`` of each text, encoded as one A1111 batch.

    ``model`` is a CLIP's ``cond_stage_model``; ``tokenize(text)`` returns
    ``{key: windows}`` with word ids (A1111 windows). A family whose A1111 reading batches
    otherwise (SD3, Flux) says how in its model's ``a1111_schedule``.
    """
    family_schedule = getattr(model, "a1111_schedule", None)
    if family_schedule is not None:
        return family_schedule(tokenize, texts, options)
    unique = list(dict.fromkeys(texts))
    order = [unique.index(t) for t in texts]
    tokens = [tokenize(text) for text in unique]
    encoders = model_encoders(model)
    chunks = max(len(windows) for per_text in tokens for windows in per_text.values())
    sides = {}
    for key, encoder in encoders.items():
        padded = [list(t[key]) + [_empty_window(encoder)] * (chunks - len(t[key])) for t in tokens]
        mode = get_weight_mode(encoder.resolve_options(options).weight_mode)
        run = _encode_side if isinstance(mode, A1111Emphasis) else _encode_each
        sides[key] = run(encoder, padded, order, options)
    if len(sides) == 1:
        ((cond, pooled),) = sides.values()
    else:  # SDXL: L and G side by side, G's pooled output
        cond, pooled = torch.cat([sides["l"][0], sides["g"][0]], dim=-1), sides["g"][1]
    return [(cond[i:i + 1], pooled[i:i + 1]) for i in range(len(texts))]


#: ``schedule_encoding`` name → the routine that encodes one schedule's texts together.
SCHEDULE_ENCODINGS: dict[str, ScheduleEncoder] = {"a1111": encode_a1111_schedule}


def schedule_encoder(name: Optional[str]) -> Optional[ScheduleEncoder]:
    """The routine a dialect's ``schedule_encoding`` names; None for None (each text alone).

    Raises:
        PromptError: a name no routine has.
    """
    if name is None:
        return None
    if name not in SCHEDULE_ENCODINGS:
        raise PromptError(f"unknown schedule encoding {name!r}; known: {', '.join(SCHEDULE_ENCODINGS)}")
    return SCHEDULE_ENCODINGS[name]
