"""Batched encode: many prompts through one forward per text encoder, each prompt's
result bit for bit what encoding it alone gives.

Prompts with the same number of windows per role are stacked into one forward
of each encoder, for the last layer and an intermediate one alike; weighting is
then applied per prompt exactly as :func:`textenc.text_encoders.encode.encode_token_weights`
applies it. Each prompt's pooled rows are projected in a batch of their own
(``row_groups``), of the rows ComfyUI projects for that prompt, because matmul
kernels round a 1-2 row product differently from a larger one
(:meth:`textenc.nn.clip_model.CLIPTextModel.project_pooled`; ``tests/test_dataset_batching.py``
checks it at 1 and 2 threads). A prompt whose weighting needs extra encodes
(compel's down-weights, ``.blend()``, ``.and()``), whose roles end up with
different lengths (SDXL pads the shorter side) or which has no windows takes the
direct call, ``encode_token_weights``.

:class:`FamilyEncodeMixin` gives a family wrapper (one that holds ``encoders``
by role) its public batched encode and its empty-prompt window.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import torch

from ..errors import PromptError
from .encode import check_weighted, empty_encoding, encode_windows, pair_weights
from .weighting import apply_weights, get_weight_mode

__all__ = ["Encoded", "FamilyEncodeMixin", "PromptByPromptMixin", "encode_batch", "ERRORS"]

#: ``errors=`` of :func:`encode_batch`: raise the first prompt's PromptError, or return it in its place.
ERRORS = ("raise", "return")


class Encoded(NamedTuple):
    """One prompt's encoding, as ``encode_token_weights`` returns it."""

    cond: torch.Tensor    # (1, T·windows, D)
    pooled: torch.Tensor  # (1, P)


def _has_compel_tags(windows: Sequence[Sequence[Any]]) -> bool:
    """Whether compel-syntax tokens carry fragment tags (``.compel``, see
    :mod:`textenc.prompts.dialects.compel.tokens`) that only the direct encode applies."""
    return any(getattr(pair, "compel", None) is not None for window in windows for pair in window)


def _weighted(encoder: Any, windows: list, z: torch.Tensor, opts: Any) -> torch.Tensor | None:
    """``z`` (W, T, D) of one prompt weighted as ``encode_token_weights`` weighs it; None:
    the prompt needs the direct call. Raises PromptError for a bad weight."""
    weights, _ = pair_weights(windows, opts.normalization)
    if opts.weight_mode == "compel" and (bool((weights < 1.0).any()) or _has_compel_tags(windows)):
        return None  # down-weights, .blend() and .and() need compel's extra encodes
    if opts.weight_mode != "none" and bool((weights != 1.0).any()):
        z_empty = empty_encoding(encoder, z.shape[1], opts)[0]
        z = apply_weights(z, weights.to(z.device), z_empty, opts.weight_mode)
    check_weighted(z, weights)
    return z


def _empty_alongside(prompt: list, opts: Any) -> bool:
    """Whether the direct call encodes ``prompt`` with the empty prompt's window alongside
    (see :class:`~textenc.text_encoders.weighting.mode.PerWindowWeighting`)."""
    mode = get_weight_mode(opts.weight_mode)
    if not (getattr(mode, "empty_alongside", False) and getattr(mode, "uses_weights", True)):
        return False
    try:
        return bool((pair_weights(prompt, opts.normalization)[0] != 1.0).any())
    except PromptError:
        return False  # _weighted raises it in this prompt's place


def _encode_side(encoder: Any, prompts: Sequence[list], options: Mapping[str, Any] | None) -> list:
    """One encoder, prompts of equal window counts → per prompt ``(cond (T, D), pooled (P,))``,
    None (direct call) or the PromptError its weights raise."""
    opts = encoder.resolve_options(options)
    windows = [[pair[0] for pair in window] for prompt in prompts for window in prompt]
    groups = [len(prompt) for prompt in prompts]
    z, pooled = encode_windows(encoder, windows, opts, row_groups=groups,
                               empty_alongside=[_empty_alongside(prompt, opts) for prompt in prompts])[:2]
    count = groups[0]
    results: list = []
    for index, prompt in enumerate(prompts):
        try:
            weighted = _weighted(encoder, prompt, z[index * count:(index + 1) * count], opts)
        except PromptError as exc:
            results.append(exc)
            continue
        results.append(None if weighted is None else
                       (weighted.reshape(-1, weighted.shape[-1]), pooled[index * count]))
    return results


def _group_key(model: Any, prompt: Mapping[str, list]) -> tuple[int, ...] | None:
    """Window count per role; None: the prompt takes the direct call."""
    if not all(role in prompt and len(prompt[role]) for role in model.encoders):
        return None
    return tuple(len(prompt[role]) for role in model.encoders)


def _direct(model: Any, prompt: Mapping[str, list], options: Mapping[str, Any] | None):
    try:
        out = model.encode_token_weights(prompt, options=options)
    except PromptError as exc:
        return exc
    return Encoded(out[0], out[1])


def _one(model: Any, prompt: Mapping[str, list], sides: Mapping[str, Any], options):
    for side in sides.values():  # role order: the first bad side decides, as the direct call
        if isinstance(side, PromptError):
            return side
        if side is None:
            return _direct(model, prompt, options)
    combined = model.combine_roles(sides)
    return _direct(model, prompt, options) if combined is None else combined


def encode_batch(model: Any, prompts: Sequence[Mapping[str, list]], *,
                 options: Mapping[str, Any] | None = None, errors: str = "raise") -> list:
    """Each prompt's :class:`Encoded`, equal to ``model.encode_token_weights(prompt, options=options)``.

    Args:
        model: a family wrapper: ``encoders`` by role, ``combine_roles``, ``encode_token_weights``.
        prompts: ``{role: windows}`` per prompt, as the family's tokenizer returns them.
        errors: ``"raise"`` the first bad prompt's PromptError, or ``"return"`` it in that prompt's place.

    Raises:
        PromptError: (``errors="raise"``) a bad prompt or weight. EncodeError,
            CheckpointError: as the direct call (these end the whole batch).
    """
    if errors not in ERRORS:
        raise PromptError(f"errors={errors!r} is not one of {ERRORS}")
    results: list = [None] * len(prompts)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, prompt in enumerate(prompts):
        key = None if getattr(model, "return_attention_masks", False) else _group_key(model, prompt)
        if key is None:
            results[index] = _direct(model, prompt, options)
        else:
            groups.setdefault(key, []).append(index)
    for indices in groups.values():
        sides = {role: _encode_side(encoder, [prompts[i][role] for i in indices], options)
                 for role, encoder in model.encoders.items()}
        for position, index in enumerate(indices):
            per_role = {role: side[position] for role, side in sides.items()}
            results[index] = _one(model, prompts[index], per_role, options)
    if errors == "raise":
        for result in results:
            if isinstance(result, PromptError):
                raise result
    return results


class FamilyEncodeMixin:
    """The batched encode and the empty window of a family wrapper holding ``encoders`` by role.

    The family's result is its roles' conds side by side (role order) and the
    pooled output of :attr:`pooled_role` (default: the last role), as SD1, SD2
    and SDXL do; a family that combines otherwise overrides :meth:`combine_roles`.
    """

    pooled_role: str | None = None

    @property
    def return_attention_masks(self) -> bool:
        """Whether an encoder returns attention masks (the batched encode then calls each alone)."""
        return any(encoder.return_attention_masks for encoder in self.encoders.values())

    def combine_roles(self, sides: Mapping[str, tuple]) -> Encoded | None:
        """``(cond (T, D), pooled (P,))`` per role → the family's :class:`Encoded`; None where the
        roles' lengths differ (the direct call pads them)."""
        if len({cond.shape[0] for cond, _ in sides.values()}) != 1:
            return None
        pooled = sides[self.pooled_role or list(sides)[-1]][1]
        cond = torch.cat([cond for cond, _ in sides.values()], dim=-1)
        return Encoded(cond.unsqueeze(0), pooled.unsqueeze(0))

    def encode_token_weights_batch(self, prompts: Sequence[Mapping[str, list]], *,
                                   options: Mapping[str, Any] | None = None, errors: str = "raise") -> list:
        """:func:`encode_batch` on this wrapper: each prompt's ``(cond [1, T, D], pooled [1, P])``."""
        return encode_batch(self, prompts, options=options, errors=errors)

    def empty_window(self, options: Mapping[str, Any] | None = None) -> torch.Tensor:
        """One window of the empty prompt's encoding, (T, D): every role's side by side."""
        return torch.cat([empty_encoding(encoder, encoder.max_length, encoder.resolve_options(options))[0]
                          for encoder in self.encoders.values()], -1)


class PromptByPromptMixin:
    """The batched encode and the empty prompt of a family whose roles do not line up
    window by window (SD3, Flux, Wan: a T5 sequence of its own length beside CLIP's
    77-token windows): each prompt is encoded on its own, so each result is exactly
    what ``encode_token_weights`` gives it.

    The wrapper says its empty prompt's tokens per role in :meth:`empty_tokens`.
    """

    def empty_tokens(self) -> dict[str, list]:
        """``{role: windows}`` of the empty prompt, as the family's tokenizer gives it."""
        raise NotImplementedError

    def encode_token_weights_batch(self, prompts: Sequence[Mapping[str, list]], *,
                                   options: Mapping[str, Any] | None = None, errors: str = "raise") -> list:
        """Each prompt's :class:`Encoded` from its own ``encode_token_weights`` call; see :func:`encode_batch`."""
        if errors not in ERRORS:
            raise PromptError(f"errors={errors!r} is not one of {ERRORS}")
        results = [_direct(self, prompt, options) for prompt in prompts]
        if errors == "raise":
            for result in results:
                if isinstance(result, PromptError):
                    raise result
        return results

    def empty_window(self, options: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The empty prompt's cond, (T, D): the family's whole empty encoding (SD3: CLIP's
        77 rows then T5's 77; Flux: T5's 256; Wan: UMT5's 512)."""
        return self.encode_token_weights(self.empty_tokens(), options=options, need_pooled=False)[0][0]
