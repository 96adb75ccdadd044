"""compel's embedding algorithm (``weight_mode="compel"``), on token windows.

Facts from compel 2.5.1 (``embeddings_provider.py``, ``compel.py``), code textenc's.
For one prompt (a *member*), with ``z_empty`` the empty prompt's encoding and
``w`` the per-token weights (float32):

1. ``base``: the chunks encoded, then every token whose weight is not 1 becomes
   ``z_empty + (z - z_empty)·w`` — down-weights included, so weight 0 leaves
   ``z_empty`` in place.
2. For each down-weighted fragment ``f`` (weight ``w_f`` < 1; neighbours of equal
   weight were joined into one fragment by the grammar): the same chunks encoded
   with ``f``'s positions masked out of attention
   (:mod:`textenc.prompts.dialects.compel.tokens` says which), weighted
   exactly as ``base`` (the masked-out encoding carries the weights too).
3. The result is ``Σ t_i·E_i / Σ t_i`` over ``[base, without_f...]`` with
   ``t_base = 1`` and ``t_f = tan((1 - max(w_f, 1e-5))·π/2)``.

A ``.blend()`` sums its members' results with its weights (normalized unless
``no_normalize``), shorter members padded with ``z_empty`` chunks; an ``.and()``
part with weight ``a`` ≠ 1 becomes ``z_empty + (c - z_empty)·a``; the parts are
concatenated along the tokens. Token windows without compel tags (another
syntax) are one member whose fragments are the runs of equal weight.

The pooled output is the one compel's ``requires_pooled`` returns: the raw
prompt text (markup included, cut to one window) encoded without weights or
masks; for untagged windows, the first window's.

:data:`COMPEL` is this weight mode; :func:`empty_conditioning` and
:func:`pad_conditioning_tensors_to_same_length` pad a prompt and its negative
to one length, as compel's methods of those names.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import torch

from ...errors import PromptError
from .comfy import COMFY
from .mode import EncoderCalls

__all__ = ["COMPEL", "CompelWeighting", "COMPEL_MIN_WEIGHT", "lerp_weight", "encode_compel",
           "pad_conditioning_tensors_to_same_length", "empty_conditioning"]

#: compel clamps a down-weight to this before ``tan`` so weight 0 stays finite.
COMPEL_MIN_WEIGHT = 1e-5

Encode = Callable[..., tuple]  # (windows, mask (W, T) or None) -> (z (W, T, D), pooled (W, P))


def lerp_weight(weight: float) -> float:
    """compel's blend factor for the encoding without a fragment of weight ``weight`` < 1.

    >>> round(lerp_weight(0.5), 12), round(lerp_weight(0.0))  # half-way; 0 is clamped to 1e-5
    (1.0, 63662)
    """
    return math.tan((1.0 - max(weight, COMPEL_MIN_WEIGHT)) * math.pi / 2)


class _Fragment(NamedTuple):
    weight: float
    masked: torch.Tensor  # (W_member, T) bool: positions masked out of attention


class _Member(NamedTuple):
    windows: list[int]          # indices into the prompt's windows
    fragments: list[_Fragment]
    blend_weight: Optional[float]


class _Part(NamedTuple):
    weight: float
    normalize: bool
    members: list[_Member]


def _tag(token) -> object:
    return getattr(token, "compel", None)


def _tagged_layout(pairs: Sequence[Sequence]) -> list[_Part]:
    """Parts and members from the :class:`CompelTag` of every token."""
    parts: dict[int, _Part] = {}
    members: dict[tuple[int, int], _Member] = {}
    masks: dict[tuple[int, int, int], tuple[float, dict[int, list[int]]]] = {}
    for index, window in enumerate(pairs):
        head = _tag(window[0])
        key = (head.part, head.member)
        if head.part not in parts:
            parts[head.part] = _Part(head.part_weight, head.normalize, [])
        if key not in members:
            members[key] = _Member([], [], head.blend_weight)
            parts[head.part].members.append(members[key])
        members[key].windows.append(index)
        for column, token in enumerate(window):
            tag = _tag(token)
            if tag.fragment >= 0:
                entry = masks.setdefault(key + (tag.fragment,), (tag.fragment_weight, {}))
                entry[1].setdefault(index, []).append(column)
    for (part, member, _), (weight, positions) in sorted(masks.items()):
        _add_fragment(members[(part, member)], weight, positions, len(pairs[0]))
    return [parts[k] for k in sorted(parts)]


def _add_fragment(member: _Member, weight: float, positions: dict[int, list[int]], length: int) -> None:
    masked = torch.zeros(len(member.windows), length, dtype=torch.bool)
    for row, window in enumerate(member.windows):
        masked[row, positions.get(window, [])] = True
    member.fragments.append(_Fragment(weight, masked))


def _runs_layout(weights: torch.Tensor, content: torch.Tensor) -> list[_Part]:
    """Untagged windows: one member; each run of equal weight < 1 is a fragment,
    masked from its first to its last token except each window's edges (compel's
    rule across chunks)."""
    count, length = weights.shape
    member = _Member(list(range(count)), [], None)
    flat_w, flat_c = weights.reshape(-1).tolist(), content.reshape(-1).tolist()
    runs: list[list] = []  # [weight, first, last]
    for position, (weight, is_content) in enumerate(zip(flat_w, flat_c)):
        if not is_content:
            continue
        if runs and runs[-1][0] == weight:
            runs[-1][2] = position
        else:
            runs.append([weight, position, position])
    for weight, first, last in runs:
        if weight >= 1:
            continue
        span = [p for p in range(first, last + 1) if p % length not in (0, length - 1)]
        positions: dict[int, list[int]] = {}
        for p in span:
            positions.setdefault(p // length, []).append(p % length)
        _add_fragment(member, weight, positions, length)
    return [_Part(1.0, True, [member])]


def _content_mask(pairs, word_ids: Optional[torch.Tensor], special: dict) -> torch.Tensor:
    if word_ids is not None:
        return word_ids != 0
    ids = {special.get(k) for k in ("start", "end", "pad")}
    return torch.tensor([[isinstance(p[0], torch.Tensor) or int(p[0]) not in ids for p in w] for w in pairs])


def _weigh(z: torch.Tensor, weights: torch.Tensor, z_empty: torch.Tensor) -> torch.Tensor:
    """compel's per-token weighting of (W, T, D) chunks; weight-1 tokens keep z exactly."""
    w = weights.unsqueeze(-1).expand(z.shape)
    return torch.where(w == 1, z, z_empty + (z - z_empty) * w)


def _weighted_sum(stack: torch.Tensor, factors: Sequence[float], normalize: bool) -> torch.Tensor:
    """compel's ``apply_embedding_weights``: Σ f_i·E_i (f normalized to sum 1 when asked)."""
    f = torch.tensor(list(factors), dtype=stack.dtype, device=stack.device)
    if normalize:
        f = f / torch.sum(f)
    return torch.sum(stack * f.reshape(-1, 1, 1), dim=0)


def _pad_tokens(conds: list[torch.Tensor], z_empty: torch.Tensor) -> list[torch.Tensor]:
    """(N_i, D) tensors padded with whole ``z_empty`` chunks to the longest."""
    longest = max(c.shape[0] for c in conds)
    return [torch.cat([c] + [z_empty] * ((longest - c.shape[0]) // z_empty.shape[0])) for c in conds]


def encode_compel(pairs: Sequence[Sequence], weights: torch.Tensor, word_ids: Optional[torch.Tensor], *,
                  encode: Encode, empty: Callable[[int], torch.Tensor],
                  special: dict, need_pooled: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """compel's conditioning for token windows → ``(cond (1, N, D), pooled (1, P))``.

    Args:
        pairs: windows of ``(token, weight[, word_id])`` tuples, compel-tagged or not.
        weights: (W, T) float weights of ``pairs`` (after any normalization).
        word_ids: (W, T) word ids, or None.
        encode: ``encode(windows, mask)`` → ``(z (W, T, D), pooled (W, P))``; ``mask`` (W, T)
            zeroes attention to a position, None for none.
        empty: ``empty(T)`` → the empty prompt's (T, D) encoding.
        special: the model's ``{"start", "end", "pad"}`` ids.
        need_pooled: False when the caller discards the pooled output (SDXL's
            L encoder): the raw-text window is not encoded and pooled is None.
    """
    tagged = all(_tag(w[0]) is not None for w in pairs)
    weights = weights.to(torch.float32)
    parts = _tagged_layout(pairs) if tagged else _runs_layout(weights, _content_mask(pairs, word_ids, special))
    windows = [[p[0] for p in w] for w in pairs]
    raw = _tag(pairs[0][0]).pooled_window if tagged and need_pooled else None
    z, pooled = _encode_with_pooled(encode, windows, raw)
    z_empty = empty(z.shape[1]).to(z)
    weights = weights.to(z.device)
    jobs = [(m, f) for part in parts for m in part.members for f in m.fragments]
    if jobs:
        job_windows = [windows[i] for m, _ in jobs for i in m.windows]
        mask = torch.cat([(~f.masked).long() for _, f in jobs]).to(z.device)
        z_without = encode(job_windows, mask)[0]
    out, row = [], 0
    for part in parts:
        conds = []
        for member in part.members:
            rows = torch.tensor(member.windows, device=z.device)
            stack = [_weigh(z[rows], weights[rows], z_empty).reshape(-1, z.shape[-1])]
            for fragment in member.fragments:
                chunk = z_without[row:row + len(member.windows)]
                stack.append(_weigh(chunk, weights[rows], z_empty).reshape(-1, z.shape[-1]))
                row += len(member.windows)
            factors = [1.0] + [lerp_weight(f.weight) for f in member.fragments]
            conds.append(_weighted_sum(torch.stack(stack), factors, True) if member.fragments else stack[0])
        out.append(_combine_members(part, conds, z_empty))
    return torch.cat(out).unsqueeze(0), (pooled.unsqueeze(0) if need_pooled else None)


def _encode_with_pooled(encode: Encode, windows: list[list], raw: Optional[Sequence[int]]):
    """The windows' (W, T, D) encoding and the (P,) pooled output compel returns.

    compel pools the raw prompt text's window (``raw``, see
    :func:`textenc.prompts.dialects.compel.tokens.pooled_window`), encoded in the same
    forward as one more row unless it is the first window already; without it
    (tokens of another syntax) the first window's pooled output is used.
    """
    extra = [list(raw)] if raw is not None and list(raw) != windows[0] else []
    z, pooled = encode(windows + extra, None)[:2]
    if pooled is None:  # an encoder without a pooled output (T5)
        return z[:len(windows)], None
    return z[:len(windows)], pooled[-1] if extra else pooled[0]


def _combine_members(part: _Part, conds: list[torch.Tensor], z_empty: torch.Tensor) -> torch.Tensor:
    """A blend's weighted sum (or the lone member), then the ``.and()`` weight."""
    if part.members[0].blend_weight is not None:
        stack = torch.stack(_pad_tokens(conds, z_empty))
        cond = _weighted_sum(stack, [m.blend_weight for m in part.members], part.normalize)
    else:
        cond = conds[0]
    if part.weight != 1:
        padded_empty = z_empty.repeat(cond.shape[0] // z_empty.shape[0], 1)
        cond = padded_empty + (cond - padded_empty) * part.weight
    return cond


def pad_conditioning_tensors_to_same_length(conditionings: Sequence[torch.Tensor],
                                            empty: torch.Tensor) -> list[torch.Tensor]:
    """Pad conditionings to the longest with copies of the empty prompt's encoding.

    compel's ``pad_conditioning_tensors_to_same_length``: with
    ``truncate_long_prompts=False`` or ``.and()``, a prompt and its negative can
    have different token counts; a diffusers pipeline needs them equal.

    Args:
        conditionings: (B, N_i, D) or (N_i, D) tensors, each N_i a multiple of T.
        empty: the empty prompt's (T, D) or (1, T, D) encoding (e.g. from
            :func:`empty_conditioning`).

    Returns:
        The tensors, as (B, N, D), in the same order.

    Raises:
        PromptError: shapes that cannot be padded (batch or width differ, or a
            token count that is not a multiple of T).
    """
    conds = [c.unsqueeze(0) if c.dim() == 2 else c for c in conditionings]
    if not conds:
        return []
    if any(c.dim() != 3 for c in conds):
        raise PromptError("conditionings must be (B, N, D) or (N, D) tensors")
    empty = empty.reshape(-1, empty.shape[-1])
    first = conds[0].shape
    if any(c.shape[0] != first[0] or c.shape[2] != first[2] or c.shape[1] % empty.shape[0] for c in conds):
        raise PromptError(f"cannot pad conditionings of shapes {[tuple(c.shape) for c in conds]}: batch and "
                          f"width must agree and token counts be multiples of {empty.shape[0]}")
    longest = max(c.shape[1] for c in conds)
    block = empty.to(conds[0]).unsqueeze(0).expand(first[0], -1, -1)
    return [torch.cat([c] + [block] * ((longest - c.shape[1]) // empty.shape[0]), dim=1) for c in conds]


def empty_conditioning(clip_model: Any, *, options: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
    """The empty prompt's (1, T, D) encoding (compel's padding block).

    ``clip_model``: an ``SDClipModel``, a ``CLIP`` or its ``cond_stage_model``. For
    SDXL the block is both encoders' empty encodings side by side, as compel's SDXL
    wrapper pads each encoder with its own.
    """
    model = getattr(clip_model, "cond_stage_model", clip_model)
    # a family wrapper holds its encoders by role; a bare SDClipModel takes windows
    tokens: Any = {role: [] for role in model.encoders} if hasattr(model, "encoders") else []
    return model.encode_token_weights(tokens, options=options)[0]


class CompelWeighting:
    """``weight_mode="compel"``: :func:`encode_compel` over the encoder's forwards."""

    name = "compel"

    def apply(self, z: torch.Tensor, weights: torch.Tensor, z_empty: Optional[torch.Tensor]) -> torch.Tensor:
        """compel's first step only: every weight, down-weights included, as ``comfy``."""
        return COMFY.apply(z, weights, z_empty)

    def encode(self, pairs: Sequence[Sequence], weights: torch.Tensor, word_ids: Optional[torch.Tensor],
               calls: EncoderCalls, *, need_pooled: bool) -> tuple:
        return encode_compel(pairs, weights, word_ids, special=calls.special_tokens, need_pooled=need_pooled,
                             encode=calls.encode, empty=calls.empty)


COMPEL = CompelWeighting()
