"""ComfyUI's quantised safetensors: scaled fp8 and per-layer ``comfy_quant`` formats.

Two ways ComfyUI marks a Linear weight as quantised (facts from ComfyUI's
``comfy/utils.py:convert_old_quants`` and ``comfy/ops.py:mixed_precision_ops``):

* **Legacy scaled fp8** (``t5xxl_fp8_e4m3fn_scaled.safetensors``): a marker tensor
  ``<prefix>scaled_fp8`` and, per Linear, ``<layer>.scale_weight`` (and optionally
  ``<layer>.scale_input``). ComfyUI converts it to the format below with
  ``{"format": "float8_e4m3fn"}`` for every layer that has a ``scale_weight``.
* **Per-layer metadata**: ``<layer>.comfy_quant`` (a uint8 tensor holding JSON such as
  ``{"format": "float8_e4m3fn"}``) or, in the header, ``_quantization_metadata``
  (``{"layers": {"<layer>": {"format": ...}}}``, which wins over the marker), with the
  scale in ``<layer>.weight_scale``.

On a CPU ComfyUI runs these layers at full precision: the weight is decoded as
``raw.to(compute) * weight_scale.to(compute)`` and ``F.linear`` runs on that;
``input_scale`` is not used. :class:`~textenc.nn.packed.ScaledFloat8Weight` decodes
exactly so. Formats other than float8 tensorwise (``nvfp4``, ``mxfp8``, int8 variants)
are refused, naming the format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from textenc.errors import CheckpointError
from textenc.nn.packed import ScaledFloat8Weight

__all__ = ["SUPPORTED_FORMATS", "unpack_quantized", "is_quantized"]

#: comfy_quant format -> the float8 dtype its weight is stored in.
SUPPORTED_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}

_LEGACY_MARKER = "scaled_fp8"
_SCALE_SUFFIXES = (".weight_scale", ".input_scale", ".scale_weight", ".scale_input", ".comfy_quant",
                   ".weight_scale_2")
#: A comfy_quant JSON is a few dozen bytes; more is not a layer config.
_MAX_CONFIG_BYTES = 4096


def is_quantized(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bool:
    """Whether the file carries any of ComfyUI's quantisation markers."""
    return "_quantization_metadata" in metadata or any(
        key.endswith(_SCALE_SUFFIXES) or key.split(".")[-1] == _LEGACY_MARKER for key in state_dict)


def unpack_quantized(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                     source: str) -> dict[str, torch.Tensor]:
    """Replace each quantised layer's ``weight`` by a packed weight; drop the scale keys.

    Args:
        state_dict: The file's tensors (memory-mapped; nothing is copied).
        metadata: The safetensors ``__metadata__`` strings.
        source: The file, named in errors.

    Returns:
        A new dict: ``<layer>.weight`` is a :class:`ScaledFloat8Weight` for every
        quantised layer; marker, ``comfy_quant`` and scale keys are gone.

    Raises:
        CheckpointError: an unsupported format (named), a bad ``comfy_quant`` or
            ``_quantization_metadata``, a missing or non-finite scale, a weight not
            stored in its format's dtype, or a scale with no layer config.
    """
    sd = dict(state_dict)
    layers = _layer_formats(sd, metadata, source)
    for layer, fmt in layers.items():
        sd[f"{layer}.weight"] = _packed(sd, layer, fmt, source)
        for suffix in _SCALE_SUFFIXES:
            sd.pop(layer + suffix, None)
    stray = [k for k in sd if k.endswith(_SCALE_SUFFIXES)]
    if stray:
        raise CheckpointError(f"{source}: scale tensor(s) {stray[:4]} belong to no quantised layer "
                              "(no comfy_quant, _quantization_metadata or scaled_fp8 marker names "
                              "them), so the weight's format is unknown; the file is malformed")
    return sd


def _layer_formats(sd: dict[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> dict[str, str]:
    """``{layer: format}`` from the header, the ``comfy_quant`` tensors and the legacy marker."""
    markers = [k for k in sd if k.split(".")[-1] == _LEGACY_MARKER]
    for key in markers:
        sd.pop(key)
    layers: dict[str, str] = {}
    if "_quantization_metadata" in metadata:
        # The header may name layers of other models in the same file: keep this one's.
        layers.update({layer: fmt for layer, fmt in _header_layers(metadata["_quantization_metadata"], source).items()
                       if f"{layer}.weight" in sd})
    elif markers:
        # ComfyUI: every layer with a scale_weight is float8_e4m3fn (convert_old_quants).
        layers.update({k[:-len(".scale_weight")]: "float8_e4m3fn" for k in sd if k.endswith(".scale_weight")})
        for key in [k for k in sd if k.endswith(".scale_weight") or k.endswith(".scale_input")]:
            layer, name = key.rsplit(".", 1)
            sd[f"{layer}.{'weight_scale' if name == 'scale_weight' else 'input_scale'}"] = sd.pop(key)
    for key in [k for k in sd if k.endswith(".comfy_quant")]:
        layers[key[:-len(".comfy_quant")]] = _tensor_config(key, sd.pop(key), source)
    for layer, fmt in layers.items():
        if fmt not in SUPPORTED_FORMATS:
            raise CheckpointError(
                f"{source}: layer {layer!r} is quantised as {fmt!r}, which textenc does not support "
                f"(supported: {sorted(SUPPORTED_FORMATS)}); use the fp16, bf16, fp8 or GGUF file instead")
    return layers


def _header_layers(text: str, source: str) -> dict[str, str]:
    try:
        layers = json.loads(text)["layers"]
        return {name: _format_of(name, conf, source) for name, conf in layers.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{source}: header _quantization_metadata is not "
                              f"{{\"layers\": {{name: {{\"format\": ...}}}}}} ({exc!r}); the file is malformed") from exc


def _tensor_config(key: str, tensor: torch.Tensor, source: str) -> str:
    if tensor.dtype != torch.uint8 or tensor.dim() != 1 or tensor.numel() > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{source}: {key!r} must be a 1-D uint8 JSON string of at most "
                              f"{_MAX_CONFIG_BYTES} bytes, got {tensor.dtype} {tuple(tensor.shape)}")
    try:
        conf = json.loads(bytes(tensor.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: {key!r} is not JSON ({exc}); the file is malformed") from exc
    return _format_of(key, conf, source)


def _format_of(name: str, conf: object, source: str) -> str:
    if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
        raise CheckpointError(f"{source}: quantisation config of {name!r} has no \"format\" string: {conf!r}")
    return conf["format"]


def _packed(sd: dict[str, torch.Tensor], layer: str, fmt: str, source: str) -> ScaledFloat8Weight:
    weight, scale = sd.get(f"{layer}.weight"), sd.get(f"{layer}.weight_scale")
    if weight is None:
        raise CheckpointError(f"{source}: layer {layer!r} is marked {fmt!r} but has no weight")
    if weight.dtype != SUPPORTED_FORMATS[fmt] or weight.dim() != 2:
        raise CheckpointError(f"{source}: {layer}.weight is {weight.dtype} {tuple(weight.shape)}, but format "
                              f"{fmt!r} stores a 2-D {SUPPORTED_FORMATS[fmt]} weight; the file is malformed")
    for name in ("weight_scale", "input_scale"):
        value = sd.get(f"{layer}.{name}")
        if value is None and name == "input_scale":
            continue
        if value is None or not value.is_floating_point() or value.numel() != 1:
            raise CheckpointError(f"{source}: {layer}.{name} must be one floating-point value, got "
                                  f"{None if value is None else (value.dtype, tuple(value.shape))}")
        if not bool(torch.isfinite(value.float()).all()):
            raise CheckpointError(f"{source}: {layer}.{name} is NaN or infinite; the file is corrupt, "
                                  "use another copy")
    return ScaledFloat8Weight(weight, scale)
