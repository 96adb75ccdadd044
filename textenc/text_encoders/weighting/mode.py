"""The one interface every weight mode offers, and what it may ask of the encoder.

A weight mode turns weighted token windows into a conditioning. The encoder
(:func:`textenc.text_encoders.encode.encode_token_weights`) reads the windows'
weights (:mod:`.normalization`), hands them to the mode named by
``weight_mode`` with :class:`EncoderCalls` (the forwards it may run), and
checks the result. Most modes encode the windows once and reweight each
encoded window from its own weights (:class:`PerWindowWeighting`); compel's
needs more forwards and overrides :meth:`WeightMode.encode`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, Sequence

import torch

__all__ = ["EncoderCalls", "WeightMode", "PerWindowWeighting"]


class EncoderCalls(NamedTuple):
    """The forwards a weight mode may run, bound to one encoder and its options.

    Attributes:
        encode: ``encode(windows, mask)`` → ``(z (W, T, D), pooled (W, P)[, extra])``;
            ``mask`` (W, T) zeroes attention to a position, None for none.
        encode_cached: ``encode_cached(windows, empty_alongside=False)`` → the same without
            a mask, through the encoder's cache of recent encodes; ``empty_alongside``: the
            pooled rows are projected as ComfyUI projects them when it encodes the empty
            prompt in the same batch (see :meth:`textenc.nn.clip_model.CLIPTextModel.project_pooled`).
        empty: ``empty(T)`` → the empty prompt's (T, D) encoding (cached).
        special_tokens: the encoder's ``{"start", "end", "pad"}`` ids.
    """

    encode: Callable[[list, Optional[torch.Tensor]], tuple]
    encode_cached: Callable[[list], tuple]
    empty: Callable[[int], torch.Tensor]
    special_tokens: Mapping[str, Any]


class WeightMode(Protocol):
    """How one ``weight_mode`` applies token weights."""

    name: str

    def apply(self, z: torch.Tensor, weights: torch.Tensor, z_empty: Optional[torch.Tensor]) -> torch.Tensor:
        """``z`` (W, T, D) weighted by ``weights`` (W, T); ``z_empty`` (T, D) is the empty
        prompt's encoding, for the modes that weigh against it (else it may be None)."""

    def encode(self, pairs: Sequence[Sequence[tuple]], weights: torch.Tensor, word_ids: Optional[torch.Tensor],
               calls: EncoderCalls, *, need_pooled: bool) -> tuple:
        """``(cond (1, N, D), pooled (1, P) or None[, extra])`` of ``(token, weight[, word_id])``
        windows whose (normalized) weights are ``weights`` (W, T)."""


class PerWindowWeighting:
    """A mode that encodes the windows once and weights each encoded window from its weights.

    Subclasses give ``name`` and :meth:`apply`; ``uses_weights = False`` skips the
    weighting (and the empty prompt's encode) altogether. ``empty_alongside = True``
    (ComfyUI's mode) projects the pooled output of weighted windows as ComfyUI does, in
    one batch with the empty prompt's window.
    """

    name: str
    uses_weights: bool = True
    empty_alongside: bool = False

    def apply(self, z: torch.Tensor, weights: torch.Tensor, z_empty: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, pairs: Sequence[Sequence[tuple]], weights: torch.Tensor, word_ids: Optional[torch.Tensor],
               calls: EncoderCalls, *, need_pooled: bool) -> tuple:
        """One cached forward of the windows, weighted when any weight is not 1; the
        windows side by side in one (1, W·T, D) row, the first window's pooled output."""
        weighted = self.uses_weights and bool((weights != 1.0).any())
        out = calls.encode_cached([[p[0] for p in w] for w in pairs], weighted and self.empty_alongside)
        z, pooled = out[0], out[1]
        if weighted:
            z = self.apply(z, weights.to(z.device), calls.empty(z.shape[1]))
        result = (z.reshape(1, -1, z.shape[-1]), pooled[0:1] if need_pooled and pooled is not None else None)
        return result + (out[2],) if len(out) > 2 else result
