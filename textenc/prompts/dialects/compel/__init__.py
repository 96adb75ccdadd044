"""compel's prompt dialect (``syntax="compel"``): grammar and chunking.

``SDTokenizer.tokenize_with_weights(text, syntax="compel")`` parses ``text`` as
compel 2.5.1 does (:mod:`.grammar`, :mod:`.parser`) and lays its fragments out in
chunks as compel does (:mod:`.tokens`); ``encode_token_weights(...,
options={"weight_mode": "compel"})`` (the default weight mode of this syntax)
applies compel's algorithm (:mod:`textenc.text_encoders.weighting.compel`, which
also pads a prompt and its negative to one length:
``pad_conditioning_tensors_to_same_length``, ``empty_conditioning``).

Keyword understood: ``truncate_long_prompts`` (default True, as compel's
``Compel(...)``): keep one 77-token chunk; False chunks the whole prompt as compel
does. Every entry point takes the option
(:data:`textenc.prompts.dialects.DIALECT_OPTIONS`); other syntaxes refuse False.

Two tokenizer attributes adapt the reading to a model, as compel's own settings do:

* ``compel_pooled_only`` (True on Flux's CLIP-L): compel's ``ReturnedEmbeddingsType.POOLED``
  reading, one unweighted window of the fragments' texts (:mod:`.pooled`);
* ``compel_truncates`` (a reason, on Flux's T5): ``truncate_long_prompts=False`` is refused
  with it (compel's ``CompelForFlux`` truncates both encoders).
"""

from __future__ import annotations

from typing import Any, Mapping

from ....errors import PromptError
from ...limits import check_prompt_size
from ...report import InspectReport, TokenReport, UnitReport
from ...vocabulary import Vocabulary
from .grammar import CompelPrompt, parse_compel
from .pooled import pooled_text, pooled_text_window
from .tokens import CompelTag, CompelToken, compel_layout, compel_windows

__all__ = ["DIALECT", "CompelDialect", "CompelTag", "CompelToken", "parse_compel"]


def _parse(tokenizer: Vocabulary, text: object) -> CompelPrompt:
    check_prompt_size(text, tokenizer.parse_options, "compel")  # also when called without SDTokenizer
    try:
        return parse_compel(text)  # type: ignore[arg-type]
    except RecursionError:
        raise PromptError("compel prompt nests brackets or quotes too deeply") from None


def _truncate(tokenizer: Vocabulary, kwargs: Mapping[str, Any]) -> bool:
    value = kwargs.get("truncate_long_prompts", True)
    if not isinstance(value, bool):
        raise PromptError(f"truncate_long_prompts must be True or False, got {value!r}")
    reason = getattr(tokenizer, "compel_truncates", None)
    if not value and reason:
        raise PromptError(f"truncate_long_prompts=False is not defined here: {reason}")
    return value


def _pooled_only(tokenizer: Vocabulary) -> bool:
    return bool(getattr(tokenizer, "compel_pooled_only", False))


class CompelDialect:
    name = "compel"
    default_weight_mode = "compel"
    applies_limits = False
    schedule_encoding = None  # no prompt editing: one text per prompt
    pads_to_min_length = False  # compel's chunk length, whatever the family's minimum

    def tokenize_with_weights(self, tokenizer: Vocabulary, text: str, return_word_ids: bool,
                              **kwargs: Any) -> list[list[tuple]]:
        """Chunks of :class:`CompelToken` (plain ``(token, weight[, word_id])`` tuples
        that carry a ``.compel`` tag for the ``compel`` weight mode)."""
        prompt = _parse(tokenizer, text)
        truncate = _truncate(tokenizer, kwargs)
        if _pooled_only(tokenizer):
            return [pooled_text_window(tokenizer, pooled_text(prompt), return_word_ids=return_word_ids)]
        return compel_windows(tokenizer, prompt, truncate=truncate, return_word_ids=return_word_ids,
                              text=text, max_windows=tokenizer.max_windows_for(kwargs))

    def inspect(self, tokenizer: Vocabulary, text: str, **kwargs: Any) -> InspectReport:
        """Chunks and fragments (units); a unit's ``start``/``end`` are -1 (not tracked);
        ``dropped_tokens``: the tokens truncation left out (their units count only those kept),
        a lower bound when ``dropped_tokens_exact`` is False (counted up to ``max_windows``)."""
        prompt = _parse(tokenizer, text)
        truncate = _truncate(tokenizer, kwargs)
        if _pooled_only(tokenizer):
            return _pooled_report(tokenizer, pooled_text(prompt))
        layout = compel_layout(tokenizer, prompt, truncate=truncate, return_word_ids=True, text=text,
                               max_windows=tokenizer.max_windows_for(kwargs))
        windows = layout.windows
        token_windows = [[TokenReport(t, tokenizer.inv_vocab.get(t, "<unknown>"), w, i) for t, w, i in window]
                         for window in windows]
        fragments = [f for part in prompt.parts for member in part.members for f in member.fragments]
        counts = [sum(1 for w in windows for t in w if t[2] == i + 1) for i in range(len(fragments))]
        units = [UnitReport(i + 1, "text", f.text, f.weight, -1, -1, n)
                 for i, (f, n) in enumerate(zip(fragments, counts))]
        return InspectReport(token_windows, units, dropped_tokens=layout.dropped,
                             dropped_tokens_exact=layout.exact,
                             truncation_fixed=getattr(tokenizer, "compel_truncates", None))


def _pooled_report(tokenizer: Vocabulary, text: str) -> InspectReport:
    """The pooled reading's one window and one unit (the joined text, weight 1)."""
    window = pooled_text_window(tokenizer, text, return_word_ids=True)
    tokens = [TokenReport(t, tokenizer.inv_vocab.get(t, "<unknown>"), w, i) for t, w, i in window]
    units = [UnitReport(1, "text", text, 1.0, -1, -1, sum(1 for _, _, i in window if i))]
    return InspectReport([tokens], units)


DIALECT = CompelDialect()
