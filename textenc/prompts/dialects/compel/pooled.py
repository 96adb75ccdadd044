"""compel's pooled-only reading: a prompt as compel's ``ReturnedEmbeddingsType.POOLED`` reads it.

compel's ``CompelForFlux`` (compel 2.5.1, ``convenience_wrappers.py``) takes Flux's pooled
output from CLIP-L this way (its ``compel_1``). Facts from ``embeddings_provider.py`` and
``compel.py``, code textenc's: with ``POOLED``,
``get_embeddings_for_weighted_prompt_fragments`` joins the flattened prompt's fragment
texts with one space and returns ``get_pooled_embeddings`` of that text: tokenized as one
string, cut to ``max_length - 2`` ids, padded, encoded without weights or masks (always
truncated, whatever ``truncate_long_prompts`` says). The weights are parsed and dropped.

A tokenizer whose ``compel_pooled_only`` is True (Flux's CLIP-L) gets this reading from the
compel dialect: one plain window, every weight 1. compel gives no single pooled row for
some prompts, and those are refused with a :class:`~textenc.errors.PromptError`:

* ``.and()`` of n > 1 prompts and ``.blend()`` of n > 1 prompts: compel returns n pooled
  rows for the one prompt (stacked, and for ``.blend()`` each the blend weight times their
  sum), which CompelForFlux hands on beside a one-row cond;
* ``.and(w)`` of one prompt with ``w`` ≠ 1 and a one-prompt ``.blend(w, no_normalize)`` with
  ``w`` ≠ 1: compel scales the pooled row against the empty prompt's; not built here.
"""

from __future__ import annotations

from ....errors import PromptError
from ...vocabulary import Vocabulary
from .grammar import CompelPrompt, Member

__all__ = ["pooled_member", "pooled_text", "pooled_text_window"]

_MULTI = ("compel's CompelForFlux pools CLIP-L once per prompt of a .and()/.blend(), so this prompt "
          "has no single pooled output (compel returns {count} pooled rows for it)")


def pooled_member(prompt: CompelPrompt) -> Member:
    """The one flattened prompt compel pools, or a PromptError where it gives no single row."""
    if len(prompt.parts) != 1 or len(prompt.parts[0].members) != 1:
        count = sum(len(part.members) for part in prompt.parts)
        raise PromptError(_MULTI.format(count=count) + "; on Flux use one prompt with weights ((x)1.3, x++), "
                          "or syntax='comfy'")
    part = prompt.parts[0]
    scale = part.weight
    if part.blend_weights is not None and not part.normalize:
        scale *= part.blend_weights[0]
    if scale != 1:
        raise PromptError(f"a one-prompt .and()/.blend() weight of {scale:g} scales compel's pooled output "
                          "against the empty prompt's, which textenc does not build for Flux's CLIP-L; "
                          "weight the text instead ((x)1.3)")
    return part.members[0]


def pooled_text(prompt: CompelPrompt) -> str:
    """The text compel pools: the fragments' texts joined with one space (markup removed).

    >>> from textenc.prompts.dialects.compel.grammar import parse_compel
    >>> pooled_text(parse_compel("a photo of a (cat)1.3 on, a mat"))
    'a photo of a cat on, a mat'
    """
    return " ".join(fragment.text for fragment in pooled_member(prompt).fragments)


def pooled_text_window(tokenizer: Vocabulary, text: str, *, return_word_ids: bool) -> list[tuple]:
    """``text``'s window as compel's ``get_pooled_embeddings`` builds it: ``[start, ids, end,
    pad...]`` of ``max_length`` tokens, ids cut to ``max_length - 2``, every weight 1 (word id 1
    on the text's tokens, 0 elsewhere)."""
    if tokenizer.start_token is None or tokenizer.end_token is None:
        raise PromptError("compel's pooled reading needs a tokenizer with start and end tokens (CLIP)")
    ids = tokenizer.encode_units([text])[0][:tokenizer.max_length - 2]
    window = [(tokenizer.start_token, 1.0, 0)] + [(i, 1.0, 1) for i in ids] + [(tokenizer.end_token, 1.0, 0)]
    window += [(tokenizer.pad_token, 1.0, 0)] * (tokenizer.max_length - len(window))
    return [values if return_word_ids else values[:2] for values in window]
