"""The dialects' names and options as plain data, and the checks every entry point shares.

Kept apart from the registry (:mod:`textenc.prompts.dialects`), which loads the
dialect modules: the dialects themselves read these tables (a1111's
``comma_padding_backtrack`` default, ``check_steps``), and command lines list and
check names without importing a dialect or torch.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import PromptError

__all__ = ["DEFAULT_SYNTAX", "SYNTAXES", "DIALECT_OPTIONS", "REFINEMENTS", "check_syntax", "dialect_options",
           "check_refinements", "default_weight_mode", "check_steps"]

DEFAULT_SYNTAX = "comfy"

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
