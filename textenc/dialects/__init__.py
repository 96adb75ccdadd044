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
Each dialect also names the ``weight_mode`` used when the caller gives none.

Optional (A1111): ``prompt_schedules(text, steps, split=True)`` returns the
``AND`` parts with their prompt-editing schedules, ``[(weight, [(end_step,
text), ...]), ...]``, and ``encode_texts(model, tokenize, texts, options)``
encodes the texts of one schedule together; :func:`prompt_schedules` gives
every dialect's schedule (one part, one text for dialects without editing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import importlib

from ..errors import PromptError

if TYPE_CHECKING:  # pragma: no cover
    from ..tokenizer import InspectReport, SDTokenizer

__all__ = ["Dialect", "SYNTAXES", "DEFAULT_SYNTAX", "get_dialect", "default_weight_mode", "check_syntax",
           "prompt_schedules"]

DEFAULT_SYNTAX = "comfy"


class Dialect(Protocol):
    """What a prompt dialect provides to the tokenizer."""

    name: str
    #: the ``weight_mode`` an encode uses when the caller names none.
    default_weight_mode: str

    def tokenize_with_weights(self, tokenizer: "SDTokenizer", text: str, return_word_ids: bool,
                              **kwargs: Any) -> list[list[tuple]]:
        """Windows of ``(token, weight[, word_id])``, as ``SDTokenizer.tokenize_with_weights``."""

    def inspect(self, tokenizer: "SDTokenizer", text: str, **kwargs: Any) -> "InspectReport":
        """The windows and units of ``text``, for ``textenc inspect``."""


#: Dialect name -> the weight mode it uses when none is given. Plain data, so
#: command lines can list and check names without importing torch.
_DEFAULT_WEIGHT_MODES = {"comfy": "comfy", "a1111": "a1111", "compel": "compel"}
SYNTAXES = tuple(_DEFAULT_WEIGHT_MODES)


def _load(name: str) -> Dialect:
    """The ``DIALECT`` of ``textenc.dialects.<name>`` (the tokenizer imports them all)."""
    return importlib.import_module(f"{__name__}.{name}").DIALECT


def check_syntax(syntax: object) -> str:
    """``syntax`` if it names a dialect, else a PromptError listing the choices."""
    if syntax not in SYNTAXES:
        raise PromptError(f"unknown prompt syntax {syntax!r}; choose one of {', '.join(SYNTAXES)}")
    return syntax  # type: ignore[return-value]


def get_dialect(syntax: str | None) -> Dialect:
    """The dialect named ``syntax`` (None means ``comfy``)."""
    return _load(check_syntax(syntax or DEFAULT_SYNTAX))


def default_weight_mode(syntax: str | None) -> str:
    """The ``weight_mode`` that goes with ``syntax`` when none is given."""
    return _DEFAULT_WEIGHT_MODES[check_syntax(syntax or DEFAULT_SYNTAX)]


def prompt_schedules(syntax: str | None, text: str, steps: int, *,
                     split: bool = True) -> list[tuple[float, list[tuple[int, str]]]]:
    """``[(weight, [(end_step, text), ...]), ...]``: the prompt's parts and their schedules.

    Dialects without prompt editing or ``AND`` give ``[(1.0, [(steps, text)])]``.
    """
    dialect = get_dialect(syntax)
    schedules = getattr(dialect, "prompt_schedules", None)
    if schedules is None:
        return [(1.0, [(steps, text)])]
    return schedules(text, steps, split=split)
