"""Prompt dialects: how a prompt's text becomes token windows and weights.

One module per dialect, each exposing a :class:`Dialect` registered here by
name. The tokenizer and the encoder call only this interface; adding a
dialect adds a module and one line in :data:`_REGISTRY`, never an
``if syntax == ...`` branch in shared code.

* ``comfy`` (default): ComfyUI's grammar and window packing, bit-exact.
* ``a1111``: AUTOMATIC1111's prompt grammar and 75-token chunking.
* ``compel``: compel's grammar.

Every entry point (``SDTokenizer.tokenize_with_weights(text, syntax=...)``,
``CLIP.tokenize``, ``textenc encode/inspect --syntax``, ``encode-dataset``,
``encode_for_pipeline`` and the advanced encode node) takes the same names.
Each dialect also names the ``weight_mode`` used when the caller gives none, and
the ``schedule_encoding`` that encodes the texts of one prompt schedule (None:
each on its own; a name is looked up by :mod:`textenc.text_encoders.schedules`,
so this package never imports model code).

Optional (A1111): ``prompt_schedules(text, steps, split=True)`` returns the
``AND`` parts with their prompt-editing schedules, ``[(weight, [(end_step,
text), ...]), ...]``; :func:`prompt_schedules` gives every dialect's schedule
(one part, one text for dialects without editing).

A dialect's own options (:data:`DIALECT_OPTIONS`, e.g. compel's
``truncate_long_prompts``) are taken by every entry point with the same name,
meaning and default; with another syntax :func:`dialect_options` accepts the
default (it changes nothing) and refuses any other value with a
:class:`~textenc.errors.PromptError` naming the option and the syntax.
Per-call refinements of one dialect (:data:`REFINEMENTS`, e.g. comfy's
``square_brackets`` or a1111's ``comma_padding_backtrack``) follow the same
rule (:func:`check_refinements`), so no entry point silently ignores one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from ..report import InspectReport
from .options import (DEFAULT_SYNTAX, DIALECT_OPTIONS, REFINEMENTS, SYNTAXES, check_refinements,  # noqa: F401
                      check_steps, check_syntax, default_weight_mode, dialect_options)

if TYPE_CHECKING:  # pragma: no cover
    # Typing only, and one way (vocabulary imports no dialect): importing it loads torch
    # (through the embedding loader), and listing the syntaxes must not.
    from ..vocabulary import Vocabulary

__all__ = ["Dialect", "SYNTAXES", "DEFAULT_SYNTAX", "DIALECT_OPTIONS", "REFINEMENTS", "get_dialect",
           "default_weight_mode", "check_syntax", "dialect_options", "check_refinements", "check_steps", "prompt_schedules"]

class Dialect(Protocol):
    """What a prompt dialect provides to the tokenizer.

    A dialect reads the tokenizer only through
    :class:`~textenc.prompts.vocabulary.Vocabulary` (vocabulary, window shape,
    embeddings, limits), which ``SDTokenizer`` passes as itself.
    """

    name: str
    #: the ``weight_mode`` an encode uses when the caller names none.
    default_weight_mode: str
    #: True when the dialect applies the tokenizer's limits (``max_prompt_chars``,
    #: ``max_windows``, ``max_weight``, ``warn_weight_above``) itself while parsing;
    #: else the tokenizer checks its input and windows (:mod:`textenc.prompts.limits`).
    applies_limits: bool
    #: how the texts of one prompt schedule are encoded: None each on its own, else
    #: the name of a routine of :data:`textenc.text_encoders.schedules.SCHEDULE_ENCODINGS`.
    schedule_encoding: str | None
    #: True when the windows are padded to the family's minimum length (ComfyUI's per-model
    #: ``min_length``, e.g. Flux's 256 T5 tokens); False when the dialect fixes its own
    #: window length (compel: its chunks, 512 T5 tokens with CompelForFlux).
    pads_to_min_length: bool

    def tokenize_with_weights(self, vocabulary: Vocabulary, text: str, return_word_ids: bool,
                              **kwargs: Any) -> list[list[tuple]]:
        """Windows of ``(token, weight[, word_id])``, as ``SDTokenizer.tokenize_with_weights``."""

    def inspect(self, vocabulary: Vocabulary, text: str, **kwargs: Any) -> InspectReport:
        """The windows and units of ``text``, for ``textenc inspect``."""


_LOADED: dict[str, Dialect] = {}  # name -> dialect, once imported (get_dialect runs per prompt)


def _load(name: str) -> Dialect:
    """The ``DIALECT`` of ``textenc.prompts.dialects.<name>`` (the tokenizer imports them all)."""
    dialect = _LOADED.get(name)
    if dialect is None:
        dialect = _LOADED[name] = importlib.import_module(f"{__name__}.{name}").DIALECT
    return dialect


def get_dialect(syntax: str | None) -> Dialect:
    """The dialect named ``syntax`` (None means ``comfy``)."""
    return _load(check_syntax(syntax or DEFAULT_SYNTAX))


def prompt_schedules(syntax: str | None, text: str, steps: int, *,
                     split: bool = True) -> list[tuple[float, list[tuple[int, str]]]]:
    """``[(weight, [(end_step, text), ...]), ...]``: the prompt's parts and their schedules.

    Dialects without prompt editing or ``AND`` give ``[(1.0, [(steps, text)])]``.

    Raises:
        PromptError: an unknown syntax, ``steps`` not a positive int, or what the dialect refuses.
    """
    dialect = get_dialect(syntax)
    check_steps(steps)
    schedules = getattr(dialect, "prompt_schedules", None)
    if schedules is None:
        return [(1.0, [(steps, text)])]
    return schedules(text, steps, split=split)
