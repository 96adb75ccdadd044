"""Checks a command runs before it loads model weights, so a mistake that needs no
model (a missing file, ``--clip-skip 0``, a weight above ``--max-weight``) is
reported in a moment instead of after a load of several seconds; a ``--clip-skip``
beyond the model's depth is found from the files' headers (:func:`check_clip_skip_depth`).

The model-path and clip-skip checks import no torch (the depth check does, after them).
The prompt check reads every prompt with the bundled CLIP tokenizer: the weights, the size limits and the
dialect's grammar do not depend on the model's own vocabulary; the number of
windows does, so ``max_windows`` is left to the real reading. Warnings of this first
reading are dropped: the real one gives them again, once.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterable, Mapping, Sequence

from ..loading.model_path import check_model_path
from ..text_encoders.clip_skip import check_clip_skip

__all__ = ["check_model_paths", "check_clip_skip_option", "check_clip_skip_depth", "numbered_depth",
           "check_prompt_limits"]


def check_model_paths(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Each ``--model`` path as a string, after :func:`~textenc.loading.model_path.check_model_path`.

    Raises:
        CheckpointError: a path that does not exist or is not valid UTF-8.
    """
    return [check_model_path(path) for path in paths]


def check_clip_skip_option(clip_skip: int | None) -> None:
    """``--clip-skip`` as far as it can be checked without the model (not 0).

    Raises:
        LayerError: 0 (the depth: :func:`check_clip_skip_depth`).
    """
    if clip_skip is not None:
        check_clip_skip(clip_skip)


def numbered_depth(models: Sequence[str | os.PathLike]) -> int | None:
    """The layers ComfyUI's numbering counts for the model's shallowest text encoder, read
    from the files' safetensors headers (a diffusers folder's ``config.json``) without loading
    a weight; None for a model whose depth cannot be read so (a ``.ckpt``, GGUF, a broken file).

    It is the loaded model's ``numbered_layers``, or more: which encoder is SD2's ViT-H (23
    layers numbered as 24) is the loader's to decide, so every encoder one layer short of a
    released model counts as that model here; the loaded model refuses what it lacks.
    """
    from ..loading.depth import text_encoder_depths
    from ..text_encoders.families import families

    depths = text_encoder_depths(models)
    if not depths:
        return None
    released = {role.released_model[1] for family in families() for role in family.roles
                if role.released_model is not None}
    return min(depth + 1 if depth + 1 in released else depth for depth in depths)


def check_clip_skip_depth(clip_skip: int | None, models: Sequence[str | os.PathLike]) -> None:
    """``--clip-skip`` against the model's :func:`numbered_depth`, before any weight is
    loaded; the message is the one the loaded model gives. A model whose depth cannot be
    read so is checked once loaded, as before.

    Raises:
        LayerError: beyond the shallowest text encoder's depth.
    """
    if clip_skip is None:
        return
    from ..text_encoders.clip_skip import layer_from_clip_skip

    numbered = numbered_depth(models)
    if numbered is not None:
        layer_from_clip_skip(clip_skip, numbered, numbering="a1111")


def check_prompt_limits(prompts: Sequence[str], *, syntax: str, syntax_options: Mapping[str, Any],
                        limits: Mapping[str, Any]) -> None:
    """Read every prompt as ``syntax`` with the bundled tokenizer, with ``limits``
    (``max_weight=``, ...), to refuse a bad prompt before the model loads.

    Raises:
        PromptError: what the reading with the model's tokenizer would raise for the
            weights, the grammar or the prompt's size.
    """
    from ..prompts.tokenizer import SDTokenizer  # imports torch: after the checks that need none

    tokenizer = SDTokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for prompt in prompts:
            tokenizer.tokenize_with_weights(prompt, syntax=syntax, max_windows=None, **syntax_options, **limits)
