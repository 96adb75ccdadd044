"""Prompt-weight interpretation: how token weights change an encoding, one module per mode.

Modes (``weight_mode``), each an object with the one small interface of
:class:`~.mode.WeightMode`, registered here by name:

* ``comfy`` (default, ComfyUI; :mod:`.comfy`): ``z_empty + (z - z_empty) * w``
  for every token whose weight is not 1, where ``z_empty`` is the encoding of
  the empty prompt at the same position.
* ``a1111``, ``a1111_no_norm``, ``none`` (AUTOMATIC1111's emphasis settings
  "Original", "No norm", "None"; :mod:`.a1111`): ``z * w``, then (``a1111``)
  the window rescaled so its mean equals the unweighted window's mean;
  ``none`` ignores the weights.
* ``compel`` (:mod:`.compel`): compel's algorithm: every weighted token as
  ``comfy``, then each fragment weighted below 1 blended with an encode that
  masks it out.

The weights are read from the windows and normalised first
(``normalization``, :mod:`.normalization`). Adding a mode adds a module and
one entry in :data:`_REGISTRY`.
"""

from __future__ import annotations

import torch

from ...errors import PromptError
from .a1111 import A1111_NO_NORM, A1111_ORIGINAL, NO_EMPHASIS, A1111Emphasis
from .comfy import COMFY
from .compel import COMPEL
from .mode import EncoderCalls, PerWindowWeighting, WeightMode
from .normalization import NORMALIZATIONS, normalize_weights, token_weights

__all__ = ["WEIGHT_MODES", "NORMALIZATIONS", "WeightMode", "EncoderCalls", "PerWindowWeighting",
           "A1111Emphasis", "get_weight_mode", "check_mode", "normalize_weights", "token_weights",
           "apply_weights"]

_REGISTRY: dict[str, WeightMode] = {mode.name: mode for mode in
                                    (COMFY, A1111_ORIGINAL, A1111_NO_NORM, COMPEL, NO_EMPHASIS)}
WEIGHT_MODES = tuple(_REGISTRY)


def check_mode(weight_mode: str, normalization: str) -> None:
    """Refuse an unknown ``weight_mode`` or ``normalization`` (PromptError listing the choices)."""
    if weight_mode not in WEIGHT_MODES:
        raise PromptError(f"unknown weight_mode {weight_mode!r}; choose one of {WEIGHT_MODES}")
    if normalization not in NORMALIZATIONS:
        raise PromptError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")


def get_weight_mode(name: str) -> WeightMode:
    """The weight mode called ``name``.

    >>> get_weight_mode("a1111_no_norm").name
    'a1111_no_norm'

    Raises:
        PromptError: an unknown name, listing the choices.
    """
    mode = _REGISTRY.get(name)
    if mode is None:
        raise PromptError(f"unknown weight_mode {name!r}; choose one of {WEIGHT_MODES}")
    return mode


def apply_weights(z: torch.Tensor, weights: torch.Tensor, z_empty: torch.Tensor | None,
                  weight_mode: str) -> torch.Tensor:
    """Apply ``weights`` (windows, T) to encodings ``z`` (windows, T, D) as ``weight_mode`` does.

    ``z_empty`` (T, D) is needed by ``comfy`` and ``compel``. For ``compel`` this
    is only the first step (every weight, down-weights included, as ``comfy``);
    its down-weights also need extra encodes, which :meth:`~.mode.WeightMode.encode` runs.
    """
    return get_weight_mode(weight_mode).apply(z, weights, z_empty)
