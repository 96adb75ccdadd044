"""compel's prompt dialect (``syntax="compel"``): grammar, chunking, weighting.

``SDTokenizer.tokenize_with_weights(text, syntax="compel")`` parses ``text`` as
compel 2.5.1 does (:mod:`.compel_grammar`) and lays its fragments out in chunks
as compel does (:mod:`.compel_tokens`); ``encode_token_weights(...,
options={"weight_mode": "compel"})`` (the default weight mode of this syntax)
applies compel's algorithm (:mod:`.compel_weighting`).

Keyword understood: ``truncate_long_prompts`` (default True, as compel's
``Compel(...)``): keep one 77-token chunk; False chunks the whole prompt as compel
does. Pad a prompt and its negative to one length with
:func:`pad_conditioning_tensors_to_same_length`. Every entry point takes the
option (:data:`textenc.prompts.dialects.DIALECT_OPTIONS`); other syntaxes refuse False.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch

from ...limits import check_prompt_size
from ....errors import PromptError
from ...report import InspectReport, TokenReport, UnitReport
from .grammar import CompelPrompt, parse_compel
from .tokens import CompelTag, CompelToken, compel_windows
from ....text_encoders.compel_weighting import (COMPEL_MIN_WEIGHT, encode_compel, lerp_weight, pad_conditioning_tensors_to_same_length)

if TYPE_CHECKING:  # pragma: no cover
    from ...tokenizer import SDTokenizer

__all__ = ["DIALECT", "CompelDialect", "CompelTag", "CompelToken", "COMPEL_MIN_WEIGHT", "parse_compel",
           "encode_compel", "lerp_weight", "pad_conditioning_tensors_to_same_length", "empty_conditioning"]


def _parse(tokenizer: "SDTokenizer", text: object) -> CompelPrompt:
    check_prompt_size(text, tokenizer.parse_options, "compel")  # also when called without SDTokenizer
    try:
        return parse_compel(text)  # type: ignore[arg-type]
    except RecursionError:
        raise PromptError("compel prompt nests brackets or quotes too deeply") from None


def _truncate(kwargs: Mapping[str, Any]) -> bool:
    value = kwargs.get("truncate_long_prompts", True)
    if not isinstance(value, bool):
        raise PromptError(f"truncate_long_prompts must be True or False, got {value!r}")
    return value


class CompelDialect:
    name = "compel"
    default_weight_mode = "compel"
    applies_limits = False

    def tokenize_with_weights(self, tokenizer: "SDTokenizer", text: str, return_word_ids: bool,
                              **kwargs: Any) -> list[list[tuple]]:
        """Chunks of :class:`CompelToken` (plain ``(token, weight[, word_id])`` tuples
        that carry a ``.compel`` tag for the ``compel`` weight mode)."""
        prompt = _parse(tokenizer, text)
        return compel_windows(tokenizer, prompt, truncate=_truncate(kwargs), return_word_ids=return_word_ids,
                              text=text)

    def inspect(self, tokenizer: "SDTokenizer", text: str, **kwargs: Any) -> "InspectReport":
        """Chunks and fragments (units); a unit's ``start``/``end`` are -1 (not tracked)."""
        prompt = _parse(tokenizer, text)
        windows = compel_windows(tokenizer, prompt, truncate=_truncate(kwargs), return_word_ids=True, text=text)
        token_windows = [[TokenReport(t, tokenizer.inv_vocab.get(t, "<unknown>"), w, i) for t, w, i in window]
                         for window in windows]
        fragments = [f for part in prompt.parts for member in part.members for f in member.fragments]
        counts = [sum(1 for w in windows for t in w if t[2] == i + 1) for i in range(len(fragments))]
        units = [UnitReport(i + 1, "text", f.text, f.weight, -1, -1, n)
                 for i, (f, n) in enumerate(zip(fragments, counts))]
        return InspectReport(token_windows, units)


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


DIALECT = CompelDialect()
