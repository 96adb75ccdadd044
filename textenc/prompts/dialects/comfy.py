"""ComfyUI's prompt dialect: the tokenizer's own parse and window packing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..tokenizer import InspectReport, SDTokenizer


class ComfyDialect:
    name = "comfy"
    default_weight_mode = "comfy"
    applies_limits = True

    def tokenize_with_weights(self, tokenizer: "SDTokenizer", text: str, return_word_ids: bool,
                              **kwargs: Any) -> list[list[tuple]]:
        return tokenizer.tokenize_comfy(text, return_word_ids, **kwargs)

    def inspect(self, tokenizer: "SDTokenizer", text: str, **kwargs: Any) -> "InspectReport":
        return tokenizer.inspect_comfy(text, **kwargs)


DIALECT = ComfyDialect()
