"""What ``SDTokenizer.inspect`` reports: windows of tokens, units and embeddings.

These plain records sit below the tokenizer and the dialects, so every
dialect (``textenc.prompts.dialects``) builds its report without importing the
tokenizer module, and no import circle runs through them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from textenc.prompts.parser import Segment

if TYPE_CHECKING:  # pragma: no cover
    # Typing only, and one way (loading imports no prompt module): importing it loads
    # torch, and the dialect registry, which lists the syntaxes cheaply, imports this module.
    from textenc.loading.embeddings import EmbeddingResult

__all__ = ["TokenReport", "UnitReport", "InspectReport"]


@dataclass(frozen=True)
class TokenReport:
    """One token of one window: id (None for an embedding vector), text, weight, word id."""

    token: int | None
    text: str
    weight: float
    word_id: int


@dataclass(frozen=True)
class UnitReport:
    """One group: ``kind`` is "text", "embedding" or "break"."""

    word_id: int
    kind: str
    text: str
    weight: float
    start: int
    end: int
    num_tokens: int


@dataclass(frozen=True)
class InspectReport:
    """What :meth:`SDTokenizer.inspect` found: windows, units, embeddings and
    the segments weighted above ``warn_weight_above`` (``large_weights``), and the
    prompt tokens a truncating dialect left out (``dropped_tokens``, compel's
    ``truncate_long_prompts=True``; a lower bound when ``dropped_tokens_exact`` is False:
    a prompt past ``max_windows`` windows is counted only that far; ``truncation_fixed``
    says why they cannot be kept, where they cannot)."""

    windows: list[list[TokenReport]]
    units: list[UnitReport]
    embeddings: list[EmbeddingResult] = field(default_factory=list)
    large_weights: list[Segment] = field(default_factory=list)
    dropped_tokens: int = 0
    dropped_tokens_exact: bool = True
    #: Why the dialect cannot keep them (compel on Flux's T5: CompelForFlux always truncates),
    #: or None where ``truncate_long_prompts=False`` would.
    truncation_fixed: str | None = None

    @property
    def missing(self) -> list[EmbeddingResult]:
        """The embeddings the prompt names that were not found."""
        return [e for e in self.embeddings if e.status == "missing"]

    @property
    def rejected(self) -> list[EmbeddingResult]:
        """The embeddings found but refused (unsafe, unreadable or invalid)."""
        return [e for e in self.embeddings if e.status == "rejected"]
