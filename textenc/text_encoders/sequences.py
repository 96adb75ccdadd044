"""Facts about the token sequences of families with a T5 role (SD3, Flux, Wan), for the
entry points that store or hand on their encodings (the dataset encoder, diffusers).

A T5 role's tokens are one sequence, padded with ``0`` to the family's minimum length
(:attr:`~textenc.text_encoders.registry.Role.min_length`: SD3 77, Flux 256, Wan 512); its
part of the cond has one row per token, after any CLIP rows (SD3) or alone (Flux, Wan).

>>> pairs = [(3, 1.0), (9, 1.0), (1, 1.0), (0, 1.0), (0, 1.0)]
>>> real_length(pairs)
3
>>> [t for t, _ in pad_sequence([pairs], 7)[0]]
[3, 9, 1, 0, 0, 0, 0]
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import PromptError
from .registry import Family, Role

__all__ = ["t5_role", "real_length", "clip_real_length", "pad_sequence", "with_min_length",
           "sequence_length", "T5_PAD"]

#: T5's and UMT5's pad token id (the tokenizers pad with it after ``</s>``).
T5_PAD = 0


def t5_role(family: Family) -> Role | None:
    """The family's T5 role (one at most in every built-in family), or None (SD1, SD2, SDXL)."""
    found = [role for role in family.roles if getattr(role, "min_length", None) is not None]
    return found[0] if found else None


def _token(pair: Sequence[Any]) -> Any:
    return pair[0]


def _is_pad(token: Any) -> bool:
    # An embedding's vectors stand in a token's place as a tensor: never padding.
    return isinstance(token, int) and not isinstance(token, bool) and token == T5_PAD


def real_length(pairs: Sequence[Sequence[Any]]) -> int:
    """Tokens of a T5 sequence up to and including its last non-pad token (``</s>``): the
    ones a tokenizer's attention mask marks 1."""
    length = len(pairs)
    while length and _is_pad(_token(pairs[length - 1])):
        length -= 1
    return length


def clip_real_length(window: Sequence[Sequence[Any]], end_token: int) -> int:
    """Tokens of a CLIP window up to and including its first end token (start, text, end):
    the ones transformers' CLIP tokenizer marks 1 in its attention mask."""
    for index, pair in enumerate(window):
        token = _token(pair)
        if index and isinstance(token, int) and token == end_token:
            return index + 1
    return len(window)


def sequence_length(windows: Sequence[Sequence[Any]]) -> int:
    """Rows a T5 role adds to the cond: its token count (one sequence, already padded)."""
    return sum(len(window) for window in windows)


def pad_sequence(windows: Sequence[Sequence[Any]], min_length: int) -> list[list[tuple]]:
    """A T5 role's windows with the last padded by ``(0, 1.0[, 0])`` to at least ``min_length``
    tokens in all, as the tokenizer pads to its own minimum."""
    out = [list(window) for window in windows]
    missing = min_length - sequence_length(out)
    if missing > 0 and out:
        width = len(out[-1][-1]) if out[-1] else 2
        pad = (T5_PAD, 1.0, 0)[:width]
        out[-1].extend([pad] * missing)
    return out


def with_min_length(family: Family, tokens: Mapping[str, list], min_length: int | None) -> dict[str, list]:
    """``tokens`` with the family's T5 role padded to at least ``min_length`` (None: as they are).

    A longer minimum than the family's (diffusers' ``max_sequence_length``, kohya's
    ``t5xxl_max_token_length``) changes every T5 row where T5 runs unmasked (SD3, Flux):
    padding is attended. It is a setting of the encoding, never applied afterwards.

    A compel-read T5 sequence (``syntax="compel"``, Flux) is compel's fixed chunk: a longer
    minimum is a :class:`~textenc.errors.PromptError` (compel pads nothing into its chunk).
    """
    role = t5_role(family)
    out = dict(tokens)
    if role is not None and min_length is not None and role.name in out:
        _check_compel_length(out[role.name], min_length)
        out[role.name] = pad_sequence(out[role.name], min_length)
    return out


def _check_compel_length(windows: Sequence[Sequence[Any]], min_length: int) -> None:
    length = sequence_length(windows)
    tagged = any(getattr(pair, "compel", None) is not None for window in windows[:1] for pair in window[:1])
    if tagged and min_length > length:
        raise PromptError(f"syntax='compel' reads T5 in compel's chunk of {length} tokens; a minimum T5 length "
                          f"of {min_length} (max_sequence_length, t5_min_length) would pad it, which compel "
                          "does not: leave it unset or at most the chunk")
