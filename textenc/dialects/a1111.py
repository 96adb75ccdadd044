"""AUTOMATIC1111's prompt dialect.

Provisional: A1111's weight convention, ``[x]`` and ``BREAK`` over ComfyUI's
window packing. The exact A1111 grammar and 75-token chunking replace this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..tokenizer import InspectReport, SDTokenizer

_SYNTAX = {"weight_convention": "a1111", "square_brackets": True, "break_keyword": True}


class A1111Dialect:
    name = "a1111"
    default_weight_mode = "a1111"

    def tokenize_with_weights(self, tokenizer: "SDTokenizer", text: str, return_word_ids: bool,
                              **kwargs: Any) -> list[list[tuple]]:
        return tokenizer.tokenize_comfy(text, return_word_ids, **{**kwargs, **_SYNTAX})

    def inspect(self, tokenizer: "SDTokenizer", text: str, **kwargs: Any) -> "InspectReport":
        return tokenizer.inspect_comfy(text, **{**kwargs, **_SYNTAX})


DIALECT = A1111Dialect()
