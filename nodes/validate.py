"""Input and output checks for every node: typed errors that name the node and the input.

ComfyUI checks widget values against ``INPUT_TYPES`` before a node runs, but a
host calling the nodes directly (or an API prompt it does not validate) may
not; and no host checks that a ``CLIP`` input is a CLIP. :func:`checked` wraps a
node's ``FUNCTION``: each argument is checked against the node's own
declaration (type, range, choices) and, for model and tensor types, against the
library's classes; every CONDITIONING output must be finite.

Errors come from :mod:`textenc.errors`: ``CheckpointError`` for model inputs
and file names, ``LayerError`` for layers, ``ConditioningError`` for
conditioning and its strengths, ``ImageError`` for images, ``PromptError`` for
text and prompt options, ``TextencError`` for the rest. The library is imported
when a node runs, never when the pack is imported.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

#: Inputs whose errors are more specific than their type's (name -> textenc.errors class name).
ERROR_BY_INPUT = {"stop_at_clip_layer": "LayerError", "type": "CheckpointError",
                  "conditioning_to_strength": "ConditioningError", "strength": "ConditioningError",
                  "noise_augmentation": "ConditioningError", "token_normalization": "PromptError",
                  "weight_interpretation": "PromptError", "weight_convention": "PromptError",
                  "square_brackets": "PromptError", "break_keyword": "PromptError", "syntax": "PromptError",
                  "truncate_long_prompts": "PromptError", "empty_padding": "PromptError",
                  "guidance": "ConditioningError", "fast_pooled": "PromptError"}
#: Error class name per input type.
ERROR_BY_TYPE = {"CLIP": "CheckpointError", "CLIP_VISION": "CheckpointError", "PHOTOMAKER": "CheckpointError",
                 "CONDITIONING": "ConditioningError", "CLIP_VISION_OUTPUT": "ConditioningError",
                 "IMAGE": "ImageError", "STRING": "PromptError"}


def _error(node: str, name: str, kind: Any, message: str, *, file_list: bool) -> Exception:
    from textenc import errors

    class_name = "CheckpointError" if file_list else ERROR_BY_INPUT.get(name) or (
        ERROR_BY_TYPE.get(kind) if isinstance(kind, str) else None)
    return getattr(errors, class_name or "TextencError")(f"{node}: {name} {message}")


def _declared(cls: type) -> dict[str, tuple]:
    types = cls.INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


def _check_number(value: Any, kind: str, options: dict) -> str | None:
    """What is wrong with an INT/FLOAT widget value, or None."""
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"must be an integer, got {value!r}"
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not math.isfinite(value)):
        return f"must be a finite number, got {value!r}"
    low, high = options.get("min"), options.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        return f"must be in [{low}, {high}], got {value!r}"
    return None


def _check_finite_conditioning(conditioning: Any) -> str | None:
    import torch

    for index, (cond, extras) in enumerate(conditioning):
        for what, tensor in (("cond", cond), ("pooled_output", extras.get("pooled_output"))):
            if isinstance(tensor, torch.Tensor) and not bool(torch.isfinite(tensor).all()):
                return f"entry {index} has a non-finite {what} (inf or nan)"
    return None


def _check_model(value: Any, kind: str) -> str | None:
    """What is wrong with a CLIP / CLIP_VISION / PHOTOMAKER input, or None."""
    if kind == "CLIP":
        from textenc.sd import CLIP as expected
        source = ('a CLIP from a textenc loader ("Load CLIP (textenc)", "DualCLIPLoader (textenc)", '
                  '"TripleCLIPLoader (textenc)" or "Load Checkpoint CLIP (textenc)")')
    elif kind == "CLIP_VISION":
        from textenc.vision.clip_vision import ClipVisionModel as expected
        source = "a CLIP_VISION from CLIPVisionLoader"
    else:
        from textenc.vision.photomaker import PhotoMakerIDEncoder as expected
        source = "a PHOTOMAKER from PhotoMakerLoader"
    if value is None:
        return f"input is None: the checkpoint or loader gave no model; connect {source}"
    if not isinstance(value, expected):
        got = f"{type(value).__module__}.{type(value).__name__}"
        if kind == "CLIP" and got.startswith("comfy."):  # ComfyUI's own loader made it
            return (f"must be {source}, got ComfyUI's own CLIP ({got}): load the model with one of those "
                    "textenc loaders, or encode this CLIP with ComfyUI's own CLIP Text Encode")
        return f"must be {source}, got {got}"
    return None


def _check_tensor_input(value: Any, kind: str, name: str) -> str | None:
    """What is wrong with an IMAGE / CONDITIONING / CLIP_VISION_OUTPUT input, or None."""
    import torch

    if kind == "IMAGE":
        if not isinstance(value, torch.Tensor) or value.ndim != 4 or not value.is_floating_point() \
                or value.shape[-1] not in (1, 3, 4):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"must be a float IMAGE tensor (batch, height, width, 1/3/4 channels), got {shape}"
        return None if bool(torch.isfinite(value).all()) else "holds inf or nan values"
    if kind == "CLIP_VISION_OUTPUT":
        embeds = getattr(value, "image_embeds", None)
        if not isinstance(embeds, torch.Tensor):
            return f"must be the output of CLIPVisionEncode, got {type(value).__name__}"
        return None if bool(torch.isfinite(embeds).all()) else "has non-finite image_embeds"
    from textenc.conditioning import validate_conditioning
    from textenc.errors import TextencError

    try:
        validate_conditioning(value, name=name)
    except TextencError as exc:
        return f"is malformed: {exc}"
    return _check_finite_conditioning(value)


def _problem(value: Any, kind: Any, options: dict, name: str) -> str | None:
    if isinstance(kind, list):
        return None if isinstance(value, str) and value in kind else f"{value!r} is not one of {kind}"
    if kind in ("INT", "FLOAT"):
        return _check_number(value, kind, options)
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if kind == "STRING":
        return None if isinstance(value, str) else f"must be a string, got {type(value).__name__}"
    if kind in ("CLIP", "CLIP_VISION", "PHOTOMAKER"):
        return _check_model(value, kind)
    return _check_tensor_input(value, kind, name)


def check_input(node: str, name: str, value: Any, spec: tuple, *, file_list: bool = False) -> None:
    """Raise the typed error for ``value`` of input ``name`` if it does not fit ``spec``."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if file_list:  # names are resolved (and refused) by textenc.loading.paths, naming the input
        kind = "STRING"
    problem = _problem(value, kind, options, name)
    if problem is not None:
        raise _error(node, name, kind, problem, file_list=file_list)


def _check_outputs(cls: type, result: tuple, inputs: dict[str, Any]) -> None:
    for kind, value in zip(cls.RETURN_TYPES, result):
        problem = _check_finite_conditioning(value) if kind == "CONDITIONING" else None
        if problem is not None:
            from textenc.errors import ConditioningError

            scalars = ", ".join(f"{k}={v!r}" if isinstance(v, (int, float, str)) and len(repr(v)) < 40 else k
                                for k, v in inputs.items())
            raise ConditioningError(f"{cls.__name__}: the CONDITIONING output {problem}; it came from "
                                    f"{scalars}: check these inputs (an fp16 model that overflows, "
                                    "weights or strengths too large)")


def checked(function: Callable) -> Callable:
    """Decorate a node's FUNCTION: check its inputs before, its CONDITIONING outputs after."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(self, *args: Any, **kwargs: Any):
        cls = type(self)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        inputs = {k: v for k, v in bound.arguments.items() if k != "self"}
        declared = _declared(cls)
        files = getattr(cls, "FILE_INPUTS", ())
        for name, value in inputs.items():
            if name in declared:
                check_input(cls.__name__, name, value, declared[name], file_list=name in files)
        result = function(self, *args, **kwargs)
        _check_outputs(cls, result, inputs)
        return result

    return wrapper
