"""compel's prompt dialect (not implemented yet: refuses with a PromptError)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import PromptError

if TYPE_CHECKING:  # pragma: no cover
    from ..tokenizer import InspectReport, SDTokenizer


class CompelDialect:
    name = "compel"
    default_weight_mode = "compel"

    def tokenize_with_weights(self, tokenizer: "SDTokenizer", text: str, return_word_ids: bool,
                              **kwargs: Any) -> list[list[tuple]]:
        raise PromptError("syntax='compel' is not available yet")

    def inspect(self, tokenizer: "SDTokenizer", text: str, **kwargs: Any) -> "InspectReport":
        raise PromptError("syntax='compel' is not available yet")


DIALECT = CompelDialect()
