"""The tokenizer's prompt limits, applied to the windows of a dialect that does not apply
them itself while parsing (a1111, compel).

The comfy dialect checks ``max_prompt_chars``, ``max_windows``, ``max_weight`` and
``warn_weight_above`` as it parses, naming character positions. The other dialects
read the prompt their own way; the same limits, with the same meaning, are checked
here on their input and their windows, naming tokens instead. So a limit set on the
tokenizer or per call holds whichever ``syntax=`` is used.
"""

from __future__ import annotations

import math
from typing import Any

from textenc.errors import PromptError, PromptWarning
from textenc.prompts.parser import ParseOptions
from textenc.prompts.vocabulary import Vocabulary
from textenc.warn import warn_at_caller

__all__ = ["check_prompt_size", "check_windows"]

_SHOWN = 5  # heavy tokens named in a warning


def check_prompt_size(text: object, options: ParseOptions, syntax: str) -> None:
    """Refuse a prompt longer than ``options.max_prompt_chars`` before it is parsed.

    Raises:
        PromptError: naming the length, the limit and the syntax.
    """
    if isinstance(text, str) and len(text) > options.max_prompt_chars:
        raise PromptError(f"prompt has {len(text)} characters, more than max_prompt_chars="
                          f"{options.max_prompt_chars} (syntax={syntax!r}); shorten it or raise the limit")


def check_windows(tokenizer: Vocabulary, windows: list[list[tuple]], options: ParseOptions,
                  max_windows: int | None, syntax: str) -> None:
    """Refuse more than ``max_windows`` windows, a weight that is not finite or a token
    weighted above ``max_weight``; warn (PromptWarning) of tokens weighted above
    ``warn_weight_above``.

    Raises:
        PromptError: naming the count or the token, its window and its weight.
    """
    if max_windows is not None and len(windows) > max_windows:
        raise PromptError(f"prompt needs {len(windows)} windows of {tokenizer.max_length} tokens, more than "
                          f"max_windows={max_windows} (syntax={syntax!r}); shorten it, or pass "
                          "max_windows=None (or a larger number) to the tokenizer or to this call")
    broken = [(index, pair) for index, window in enumerate(windows) for pair in window
              if not math.isfinite(float(pair[1]))]
    if broken:
        raise PromptError(f"{_describe(tokenizer, broken[:1])}: not a finite number (syntax={syntax!r}); "
                          "a weight written with hundreds of digits reads as infinity")
    heavy = [(index, pair) for index, window in enumerate(windows) for pair in window
             if _magnitude(pair[1]) > min(_limit(options.max_weight), _limit(options.warn_weight_above))]
    if not heavy:
        return
    if options.max_weight is not None:
        over = [(i, pair) for i, pair in heavy if _magnitude(pair[1]) > options.max_weight]
        if over:
            raise PromptError(f"{_describe(tokenizer, over[:1])} exceeds max_weight={options.max_weight} "
                              f"(syntax={syntax!r}); lower the weight or raise max_weight")
    if options.warn_weight_above is not None:
        loud = [(i, pair) for i, pair in heavy if _magnitude(pair[1]) > options.warn_weight_above]
        if loud:
            more = f" and {len(loud) - _SHOWN} more" if len(loud) > _SHOWN else ""
            warn_at_caller(f"prompt weights above {options.warn_weight_above:g} (syntax={syntax!r}): "
                           f"{_describe(tokenizer, loud[:_SHOWN])}{more}; pass max_weight= to refuse them",
                           PromptWarning)


def _limit(value: float | None) -> float:
    return float("inf") if value is None else value


def _magnitude(weight: Any) -> float:
    return abs(float(weight))


def _describe(tokenizer: Vocabulary, pairs: list[tuple[int, tuple]]) -> str:
    return ", ".join(f"token {tokenizer.token_text(pair[0])!r} in window {index} has weight {float(pair[1]):.4g}"
                     for index, pair in pairs)
