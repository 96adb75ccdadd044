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

from ...errors import PromptError
from ..report import InspectReport

if TYPE_CHECKING:  # pragma: no cover
    # Typing only, and one way (vocabulary imports no dialect): importing it loads torch
    # (through the embedding loader), and listing the syntaxes must not.
    from ..vocabulary import Vocabulary

__all__ = ["Dialect", "SYNTAXES", "DEFAULT_SYNTAX", "DIALECT_OPTIONS", "REFINEMENTS", "get_dialect",
           "default_weight_mode", "check_syntax", "dialect_options", "check_refinements", "check_steps", "prompt_schedules"]

DEFAULT_SYNTAX = "comfy"


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

    def tokenize_with_weights(self, vocabulary: Vocabulary, text: str, return_word_ids: bool,
                              **kwargs: Any) -> list[list[tuple]]:
        """Windows of ``(token, weight[, word_id])``, as ``SDTokenizer.tokenize_with_weights``."""

    def inspect(self, vocabulary: Vocabulary, text: str, **kwargs: Any) -> InspectReport:
        """The windows and units of ``text``, for ``textenc inspect``."""


#: Dialect name -> the weight mode it uses when none is given. Plain data, so
#: command lines can list and check names without importing torch.
_DEFAULT_WEIGHT_MODES = {"comfy": "comfy", "a1111": "a1111", "compel": "compel"}
SYNTAXES = tuple(_DEFAULT_WEIGHT_MODES)

#: Options only one dialect understands: name -> (its syntax, default). Plain data,
#: so command lines can check them without importing torch.
#: ``truncate_long_prompts``: compel's ``Compel(truncate_long_prompts=...)``; True keeps
#: one 77-token chunk, False chunks the whole prompt (:mod:`.compel.tokens`).
DIALECT_OPTIONS: dict[str, tuple[str, Any]] = {"truncate_long_prompts": ("compel", True)}

#: Per-call keywords that refine one dialect's reading: name -> (its syntax, default).
#: Unlike :data:`DIALECT_OPTIONS` they are not filled in when left out (comfy's three
#: fall back to the tokenizer's own settings; ``strict_weights`` is about the number
#: literals of ComfyUI's grammar). ``comma_padding_backtrack``'s default is
#: A1111's 20 (:data:`textenc.prompts.dialects.a1111.chunks.DEFAULT_BACKTRACK`).
REFINEMENTS: dict[str, tuple[str, Any]] = {
    "weight_convention": ("comfy", "comfy"),
    "square_brackets": ("comfy", False),
    "break_keyword": ("comfy", False),
    "strict_weights": ("comfy", False),
    "comma_padding_backtrack": ("a1111", 20),
}


def _load(name: str) -> Dialect:
    """The ``DIALECT`` of ``textenc.prompts.dialects.<name>`` (the tokenizer imports them all)."""
    return importlib.import_module(f"{__name__}.{name}").DIALECT


def check_syntax(syntax: object) -> str:
    """``syntax`` if it names a dialect, else a PromptError listing the choices."""
    if syntax not in SYNTAXES:
        raise PromptError(f"unknown prompt syntax {syntax!r}; choose one of {', '.join(SYNTAXES)}")
    return syntax  # type: ignore[return-value]


def dialect_options(syntax: str | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options of :data:`DIALECT_OPTIONS` that belong to ``syntax``, resolved: each
    as ``given`` holds it, else its default. Other keys of ``given`` are not looked at.

    >>> dialect_options("compel", {}), dialect_options("comfy", {"truncate_long_prompts": True})
    ({'truncate_long_prompts': True}, {})

    Raises:
        PromptError: an unknown syntax, or an option of another dialect given with a
            value other than its default (naming the option, its syntax and ``syntax``).
    """
    syntax = check_syntax(syntax or DEFAULT_SYNTAX)
    resolved = {}
    for name, (owner, default) in DIALECT_OPTIONS.items():
        value = given.get(name, default)
        if owner == syntax:
            resolved[name] = value
        elif type(value) is not type(default) or value != default:
            raise PromptError(f"{name}={value!r} is an option of syntax={owner!r} only; syntax={syntax!r} "
                              f"has no such option: leave it out (or at its default {default!r}) or use "
                              f"syntax={owner!r}")
    return resolved


def check_refinements(syntax: str | None, given: Mapping[str, Any]) -> None:
    """Refuse a :data:`REFINEMENTS` keyword of ``given`` that belongs to another syntax
    and is not at its default (at its default it changes nothing, so it is accepted).

    >>> check_refinements("a1111", {"square_brackets": False, "comma_padding_backtrack": 0})
    >>> check_refinements("comfy", {"comma_padding_backtrack": 0})
    Traceback (most recent call last):
    ...
    textenc.errors.PromptError: comma_padding_backtrack=0 refines syntax='a1111' only; syntax='comfy' has its own rules: leave it out (or at its default 20) or use syntax='a1111'

    Raises:
        PromptError: naming each such keyword, its syntax and ``syntax``.
    """
    syntax = check_syntax(syntax or DEFAULT_SYNTAX)
    for name, (owner, default) in REFINEMENTS.items():
        if name not in given or owner == syntax:
            continue
        value = given[name]
        if type(value) is not type(default) or value != default:
            raise PromptError(f"{name}={value!r} refines syntax={owner!r} only; syntax={syntax!r} has its own "
                              f"rules: leave it out (or at its default {default!r}) or use syntax={owner!r}")


def get_dialect(syntax: str | None) -> Dialect:
    """The dialect named ``syntax`` (None means ``comfy``)."""
    return _load(check_syntax(syntax or DEFAULT_SYNTAX))


def default_weight_mode(syntax: str | None) -> str:
    """The ``weight_mode`` that goes with ``syntax`` when none is given."""
    return _DEFAULT_WEIGHT_MODES[check_syntax(syntax or DEFAULT_SYNTAX)]


def check_steps(steps: object) -> int:
    """``steps`` if it is a positive int (not a bool), else a PromptError.

    >>> check_steps(20)
    20
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PromptError(f"steps must be a positive int, got {steps!r}")
    return steps


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
