"""Typed, frozen model configs loaded from JSON.

Configs use Hugging Face's key names so a ``config.json`` written by
transformers (a diffusers ``text_encoder/`` folder, for instance) loads as it
is. Unknown keys and missing keys are errors naming the file and the key; a
short, explicit list of Hugging Face bookkeeping keys (``model_type``,
``transformers_version``, dropout rates that are zero at inference, ...) is
accepted and ignored, because it does not change the computation.

>>> cfg = load_text_config("sd1_clip_config")
>>> (cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_act)
(768, 12, 'quick_gelu')
"""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, TypeVar

from ..errors import ConfigError

__all__ = [
    "CLIPTextConfig",
    "CLIPVisionConfig",
    "ACTIVATIONS",
    "load_text_config",
    "load_vision_config",
    "bundled_config_names",
]

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")

#: Hugging Face keys that carry no information for inference; accepted and ignored.
IGNORED_HF_KEYS = frozenset({
    "_name_or_path", "_commit_hash", "architectures", "attention_dropout", "dropout",
    "initializer_factor", "initializer_range", "model_type", "torch_dtype", "dtype",
    "transformers_version", "output_attentions", "output_hidden_states",
    "return_dict", "use_return_dict", "_attn_implementation_autoset",
    "projection_hidden_act",
})


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a CLIP text transformer (Hugging Face key names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    projection_dim: int
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407

    def __post_init__(self) -> None:
        _validate_common(self)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Shape and preprocessing of a CLIP vision transformer."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    projection_dim: int
    num_channels: int = 3
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        _validate_common(self)
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")
        for name in ("image_mean", "image_std"):
            object.__setattr__(self, name, _channel_values(name, getattr(self, name),
                                                           self.num_channels))

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


def _validate_common(cfg: Any) -> None:
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.type in ("int",) and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{field.name} must be an integer, got {value!r}")
    positive = ("hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "projection_dim", "vocab_size",
                "max_position_embeddings", "image_size", "patch_size", "num_channels")
    for name in positive:
        if hasattr(cfg, name) and getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"hidden_size {cfg.hidden_size} is not divisible by "
                          f"num_attention_heads {cfg.num_attention_heads}")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"hidden_act {cfg.hidden_act!r} is not one of {ACTIVATIONS}")
    if not (isinstance(cfg.layer_norm_eps, (int, float))
            and not isinstance(cfg.layer_norm_eps, bool) and math.isfinite(cfg.layer_norm_eps)
            and cfg.layer_norm_eps > 0):
        raise ConfigError(f"layer_norm_eps must be a positive number, got {cfg.layer_norm_eps!r}")


def _channel_values(name: str, value: Any, channels: int) -> tuple[float, ...]:
    """A per-channel list of finite numbers (image_mean / image_std) as a tuple."""
    if (isinstance(value, (str, bytes)) or not hasattr(value, "__len__")
            or len(value) != channels
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                       and math.isfinite(x) for x in value)):
        raise ConfigError(f"{name} must be a list of {channels} numbers (one per "
                          f"channel), got {value!r}")
    return tuple(float(x) for x in value)


ConfigT = TypeVar("ConfigT", CLIPTextConfig, CLIPVisionConfig)


def _from_mapping(cls: type[ConfigT], data: Mapping[str, Any], source: str) -> ConfigT:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a config must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields) - IGNORED_HF_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s) {unknown}; "
                          f"known keys are {sorted(fields)}")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{source}: missing config key(s) {missing}")
    values = {k: v for k, v in data.items() if k in fields}
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def bundled_config_names() -> list[str]:
    """Names of the configs shipped in ``textenc/configs``."""
    folder = resources.files("textenc") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def _read(spec: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if isinstance(spec, Mapping):
        return spec, "<dict config>"
    text_spec = str(spec)
    if text_spec in bundled_config_names():
        path = resources.files("textenc") / "configs" / f"{text_spec}.json"
        source = f"textenc/configs/{text_spec}.json"
    else:
        path, source = Path(text_spec), text_spec
        if not path.is_file():
            raise ConfigError(f"config {text_spec!r} is neither a file nor a bundled "
                              f"config ({', '.join(bundled_config_names())})")
    try:
        return json.loads(path.read_text(encoding="utf-8")), source
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read config as JSON: {exc}") from exc


def load_text_config(spec: str | Path | Mapping[str, Any] | CLIPTextConfig) -> CLIPTextConfig:
    """Load a text config from a bundled name, a JSON path, a dict or a config.

    Raises:
        ConfigError: unreadable file, unknown or missing key, bad value.
    """
    if isinstance(spec, CLIPTextConfig):
        return spec
    data, source = _read(spec)
    return _from_mapping(CLIPTextConfig, data, source)


def load_vision_config(spec: str | Path | Mapping[str, Any] | CLIPVisionConfig) -> CLIPVisionConfig:
    """Load a vision config; see :func:`load_text_config`."""
    if isinstance(spec, CLIPVisionConfig):
        return spec
    data, source = _read(spec)
    return _from_mapping(CLIPVisionConfig, data, source)
