"""CLIP vision encoder for image conditioning (ComfyUI's ``comfy.clip_vision``).

:class:`ClipVisionModel` wraps :class:`textenc.nn.clip_model.CLIPVisionModelProjection`
with ComfyUI's API: ``load_sd``, ``get_sd`` and ``encode_image`` taking a ComfyUI
IMAGE (float ``[batch, height, width, channels]`` in 0..1). :func:`load` reads a
file, finds the vision tower in Hugging Face or open_clip layout (standalone,
open_clip, SD2.1-unCLIP or SVD checkpoints) and picks the bundled config from the
tensor shapes.

Weights are loaded strictly: a missing, unexpected or mis-shaped key is a
:class:`~textenc.errors.CheckpointError` listing them all. The model is built on
the ``meta`` device and the checkpoint tensors are assigned in place, so weights
are never allocated twice nor randomly initialised.

>>> preprocessed = clip_preprocess(torch.ones(1, 30, 20, 3), 14, (0.5,) * 3, (0.5,) * 3)
>>> tuple(preprocessed.shape), float(preprocessed.max())
((1, 3, 14, 14), 1.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..nn import ops
from ..loading.checkpoint import aligned, load_state_dict
from ..nn.clip_model import CLIPVisionModelProjection
from ..nn.config import CLIPVisionConfig, load_vision_config
from ..loading.convert import VISION, check_keys
from ..loading.detect import VisionInfo, convert_tower, detect_vision, find_vision_tower
from ..errors import CheckpointError, TextencError

__all__ = [
    "ClipVisionOutput",
    "ClipVisionModel",
    "VISION_KINDS",
    "clip_preprocess",
    "check_state_dict",
    "find_vision_tower",
    "detect_vision_config",
    "load_clipvision_from_sd",
    "load",
]

#: (hidden width, position embeddings) -> bundled config. 257 = (224/14)^2 + 1,
#: 577 = (336/14)^2 + 1. Width and position count tell the published towers apart;
#: the layer count is then checked by strict loading.
VISION_KINDS: dict[tuple[int, int], str] = {
    (1024, 257): "clip_vision_config_vitl",       # OpenAI ViT-L/14
    (1024, 577): "clip_vision_config_vitl_336",   # OpenAI ViT-L/14-336
    (1280, 257): "clip_vision_config_h",          # open_clip ViT-H/14
    (1664, 257): "clip_vision_config_g",          # open_clip ViT-bigG/14
}

# Keys that are buffers, not weights (HF <= 4.30 saved position_ids as a buffer).
_NON_WEIGHT_SUFFIXES = ("position_ids",)


@dataclasses.dataclass
class ClipVisionOutput:
    """What :meth:`ClipVisionModel.encode_image` returns; read as attributes or keys.

    Attributes:
        last_hidden_state: (B, 1 + patches, width), the last layer, no post layer norm.
        penultimate_hidden_states: (B, 1 + patches, width), layer -2 (ComfyUI's name).
        image_embeds: (B, projection_dim), the projected post-normed class token.
        mm_projected: Multimodal projector output; None for CLIP (ComfyUI parity).

    >>> out = ClipVisionOutput(torch.zeros(1), torch.zeros(1), torch.ones(1))
    >>> out["image_embeds"] is out.image_embeds, "mm_projected" in out
    (True, True)
    """

    last_hidden_state: torch.Tensor
    penultimate_hidden_states: torch.Tensor | None
    image_embeds: torch.Tensor
    mm_projected: torch.Tensor | None = None

    def keys(self) -> list[str]:
        return [field.name for field in dataclasses.fields(self)]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(f"{key!r}; ClipVisionOutput has {self.keys()}")
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self:
            raise KeyError(f"{key!r}; ClipVisionOutput has {self.keys()}")
        setattr(self, key, value)


def _as_rgb(image: torch.Tensor) -> torch.Tensor:
    """Validate a ComfyUI IMAGE and return it with exactly 3 channels."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or not image.is_floating_point():
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise TextencError(f"image must be a float tensor [batch, height, width, channels] "
                           f"in 0..1 (ComfyUI IMAGE), got {shape}")
    channels = image.shape[-1]
    if channels == 4:
        return image[..., :3]  # drop alpha, as ComfyUI does
    if channels == 1:
        return image.expand(-1, -1, -1, 3)
    if channels != 3:
        raise TextencError(f"image has {channels} channels (shape {tuple(image.shape)}); "
                           "expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    return image


def clip_preprocess(image: torch.Tensor, size: int, mean: Sequence[float],
                    std: Sequence[float], *, crop: bool = True) -> torch.Tensor:
    """Turn a ComfyUI IMAGE into normalised CLIP pixel values.

    Args:
        image: float [B, H, W, C] in 0..1; C is 1, 3 or 4 (alpha is dropped).
        size: Square output side (the config's ``image_size``).
        mean, std: Per-channel normalisation (the config's ``image_mean``/``image_std``).
        crop: Scale the short side to ``size`` and center-crop (as CLIP was
            trained); False stretches the whole image to ``size`` x ``size``.

    Returns:
        float32 [B, 3, size, size], quantised to 8 bits before normalising, as
        ComfyUI and PIL-based processors do.

    Raises:
        TextencError: the image is not [B, H, W, 1|3|4] float.
    """
    pixels = _as_rgb(image).movedim(-1, 1).float()  # (B, 3, H, W)
    height, width = pixels.shape[-2:]
    if (height, width) != (size, size):
        if crop:
            # Short side -> size, long side truncated like torchvision/HF
            # (int(), where ComfyUI rounds; at most one pixel, cropped away).
            if height <= width:
                target = (size, int(size * width / height))
            else:
                target = (int(size * height / width), size)
        else:
            target = (size, size)
        pixels = F.interpolate(pixels, size=target, mode="bicubic", antialias=True,
                               align_corners=False)
        top, left = (pixels.shape[2] - size) // 2, (pixels.shape[3] - size) // 2
        pixels = pixels[:, :, top:top + size, left:left + size]
    pixels = (pixels * 255.0).clamp(0, 255).round() / 255.0
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


def check_state_dict(expected: Mapping[str, torch.Size], state_dict: Mapping[str, torch.Tensor],
                     *, what: str = "CLIP vision model") -> None:
    """Raise one error naming every missing, unexpected and mis-shaped key.

    >>> check_state_dict({"w": torch.Size([2])}, {"w": torch.zeros(3), "x": torch.zeros(1)})
    Traceback (most recent call last):
    ...
    textenc.errors.CheckpointError: state dict does not fit the CLIP vision model: unexpected keys ['x']; wrong shapes ['w': expected (2,), got (3,)]
    """
    report = check_keys(expected, state_dict, strict=False, ignore_suffixes=())
    wrong = [f"{m.key!r}: expected {m.expected}, got {m.got}"
             for m in sorted(report.mismatched, key=lambda m: m.key)]
    problems = []
    for label, items in (("missing keys", [repr(k) for k in sorted(report.missing)]),
                         ("unexpected keys", [repr(k) for k in sorted(report.unexpected)]),
                         ("wrong shapes", wrong)):
        if items:
            more = f" and {len(items) - 12} more" if len(items) > 12 else ""
            problems.append(f"{label} [{', '.join(items[:12])}]{more}")
    if problems:
        raise CheckpointError(f"state dict does not fit the {what}: " + "; ".join(problems))


class ClipVisionModel:
    """A CLIP vision tower with ComfyUI's ``ClipVisionModel`` interface.

    Args:
        json_config_or_config: Bundled config name, JSON path, dict or
            :class:`~textenc.nn.config.CLIPVisionConfig`.
        device: Where weights live and compute runs.
        dtype: Storage dtype of the weights.
        compute_dtype: Dtype of the activations; defaults to ``dtype``. When it
            differs, layers cast weights per call (``ops.manual_cast``), so fp16
            weights can compute in fp32 without a second fp32 copy.

    >>> model = ClipVisionModel("clip_vision_config_vitl")
    >>> model.image_size, model.loaded
    (224, False)
    """

    def __init__(self, json_config_or_config: str | Path | Mapping | CLIPVisionConfig, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype | None = None) -> None:
        self.config = load_vision_config(json_config_or_config)
        self.image_size = self.config.image_size
        self.image_mean = self.config.image_mean
        self.image_std = self.config.image_std
        self.device = torch.device(device)
        self.dtype = dtype
        self.compute_dtype = compute_dtype or dtype
        operations = ops.pick_operations(dtype, self.compute_dtype)
        # Built on meta: no memory, no initialisation; load_sd assigns the weights.
        self.model = CLIPVisionModelProjection(self.config, dtype=dtype, device="meta",
                                               operations=operations).eval()
        self.loaded = False

    def load_sd(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load HF-layout weights strictly; ``position_ids`` buffers are ignored.

        Tensors already at the model's dtype and device are used without copying,
        unless their data is not 64-byte aligned (:func:`textenc.loading.checkpoint.aligned`).

        Raises:
            CheckpointError: missing, unexpected or mis-shaped keys (all listed).
        """
        weights = {key: value for key, value in state_dict.items()
                   if not key.endswith(_NON_WEIGHT_SUFFIXES)}
        expected = {key: value.shape for key, value in self.model.state_dict().items()}
        check_state_dict(expected, weights)
        weights = aligned({key: value.to(device=self.device, dtype=self.dtype)
                           for key, value in weights.items()})
        self.model.load_state_dict(weights, strict=True, assign=True)
        self.model.requires_grad_(False)
        self.loaded = True

    def get_sd(self) -> dict[str, torch.Tensor]:
        """The HF-layout state dict (tensors shared with the model)."""
        return self.model.state_dict()

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, crop: bool = True) -> ClipVisionOutput:
        """Encode a ComfyUI IMAGE [B, H, W, C] in 0..1.

        Args:
            image: See :func:`clip_preprocess`.
            crop: Center-crop (True) or stretch (False) to the model's square size.

        Raises:
            CheckpointError: no weights were loaded yet.
            TextencError: bad image shape.
        """
        if not self.loaded:
            raise CheckpointError("ClipVisionModel has no weights; call load_sd() or use load()")
        pixels = clip_preprocess(image.to(self.device), self.image_size, self.image_mean,
                                 self.image_std, crop=crop)
        out = self.model(pixels.to(self.compute_dtype), intermediate_output=-2)
        return ClipVisionOutput(last_hidden_state=out.last_hidden_state,
                                penultimate_hidden_states=out.intermediate,
                                image_embeds=out.image_embeds)


def _to_hf(state_dict: Mapping[str, torch.Tensor], prefix: str, inner: str) -> dict[str, torch.Tensor]:
    """Convert the tower below ``prefix`` to HF layout, refusing keys that are not the tower's."""
    result = convert_tower(state_dict, VISION, prefix=prefix, inner=inner)
    if result.unmatched:
        shown = ", ".join(map(repr, result.unmatched[:12]))
        raise CheckpointError(f"{len(result.unmatched)} key(s) below {prefix!r} are not part "
                              f"of a CLIP vision tower: {shown}")
    return result.state_dict


def _config_name(info: VisionInfo) -> str:
    """The bundled config of :data:`VISION_KINDS` that fits ``info``; the depth must match too."""
    width, positions = info.hidden_size, info.num_positions
    name = VISION_KINDS.get((width, positions))
    if name is None:
        known = ", ".join(f"{n} (width {w}, {p} positions)" for (w, p), n in VISION_KINDS.items())
        raise CheckpointError(f"unsupported CLIP vision model: width {width}, {positions} "
                              f"position embeddings; supported: {known}")
    expected_layers = load_vision_config(name).num_hidden_layers
    if info.num_layers != expected_layers:
        raise CheckpointError(f"CLIP vision tower of width {width} has {info.num_layers} layers; "
                              f"{name} needs {expected_layers} (truncated file?)")
    return name


def detect_vision_config(hf_state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name of the bundled config that fits an HF-layout vision state dict.

    Only shapes are read, so ``meta`` tensors work. Shapes are read by
    :func:`textenc.loading.detect.detect_vision`.

    Raises:
        CheckpointError: not a CLIP vision tower, or an unsupported size.
    """
    return _config_name(detect_vision(hf_state_dict))


def _from_hf(hf_state_dict: Mapping[str, torch.Tensor], **model_options: Any) -> ClipVisionModel:
    model = ClipVisionModel(detect_vision_config(hf_state_dict), **model_options)
    model.load_sd(hf_state_dict)
    return model


def load_clipvision_from_sd(state_dict: Mapping[str, torch.Tensor], prefix: str = "",
                            convert_keys: bool = False, *, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32,
                            compute_dtype: torch.dtype | None = None) -> ClipVisionModel:
    """Build a :class:`ClipVisionModel` from a state dict (ComfyUI's function of that name).

    Args:
        state_dict: The weights.
        prefix: Where the tower's keys start (e.g. ``"visual."``).
        convert_keys: True when the keys below ``prefix`` are open_clip's;
            False for Hugging Face's.

    Raises:
        CheckpointError: unknown model, or keys that do not fit.
    """
    inner = "open_clip" if convert_keys else "hf"
    if not convert_keys and prefix + "embeddings.patch_embedding.weight" in state_dict:
        inner = "hf_flat"
    return _from_hf(_to_hf(state_dict, prefix, inner), device=device, dtype=dtype,
                    compute_dtype=compute_dtype)


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         compute_dtype: torch.dtype | None = None) -> ClipVisionModel:
    """Load a CLIP vision model file (ComfyUI's ``comfy.clip_vision.load``).

    Accepts HF (``vision_model.*``), HF without the root, open_clip
    (``visual.*`` / bare ``conv1.weight``) and the towers inside SD2.1-unCLIP and
    SVD checkpoints; ViT-L/14, ViT-L/14-336, ViT-H/14 and ViT-bigG/14.

    Raises:
        CheckpointError: unreadable or unsafe file, not a CLIP vision model,
            unsupported size, or keys that do not fit.
    """
    state_dict = load_state_dict(path)
    found = find_vision_tower(state_dict)
    if found is None:
        raise CheckpointError(f"{path}: not a CLIP vision model (no vision tower key such as "
                              "'vision_model.embeddings.patch_embedding.weight' or "
                              "'visual.conv1.weight'); load it with the loader for its kind")
    try:
        return _from_hf(_to_hf(state_dict, *found), device=device, dtype=dtype,
                        compute_dtype=compute_dtype)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
