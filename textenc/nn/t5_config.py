"""``T5Config``: the shape of a T5 v1.1 or UMT5 encoder, from JSON or from a state dict.

Key names are Hugging Face's (``d_model``, ``d_kv``, ``num_heads``, ...) so a
transformers ``config.json`` (a diffusers ``text_encoder_2/`` folder) loads as
it is; the encoder-decoder bookkeeping keys it carries are accepted and
ignored. The released XXL shapes ship as ``textenc/configs/t5_xxl.json`` and
``umt5_xxl.json`` (ComfyUI's ``t5_config_xxl.json`` / ``umt5_config_xxl.json``).

:func:`t5_config_from_state_dict` reads the config from an HF-layout state
dict's shapes, so a tiny random model in the real key layout loads through the
same path as a real file, and :func:`released_t5_name` recognises the released
shapes:

>>> import torch
>>> sd = {"shared.weight": torch.empty(100, 64),
...       "encoder.block.0.layer.0.SelfAttention.q.weight": torch.empty(64, 64),
...       "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": torch.empty(32, 4),
...       "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": torch.empty(160, 64)}
>>> cfg = t5_config_from_state_dict(sd)
>>> (cfg.model_type, cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.num_layers)
('t5', 64, 160, 4, 16, 1)
>>> load_t5_config("t5_xxl").num_layers
24
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, ConfigError
from .config import IGNORED_HF_KEYS, _read

__all__ = ["T5Config", "T5_CONFIG_NAMES", "T5_ACTIVATIONS", "load_t5_config", "t5_config_from_state_dict",
           "released_t5_name"]

#: Bundled configs of the released encoders (ComfyUI's XXL files).
T5_CONFIG_NAMES = ("t5_xxl", "umt5_xxl")
#: Feed-forward activations ComfyUI's T5 knows. ``gelu_new`` is transformers' name for
#: the same tanh-approximated GELU (its T5 v1.1 configs say ``feed_forward_proj: gated-gelu``).
T5_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "relu")
MODEL_TYPES = ("t5", "umt5")

#: transformers T5 keys about the decoder, generation or training: no effect on the encoder.
_IGNORED_T5_KEYS = frozenset({
    "decoder_start_token_id", "dropout_rate", "eos_token_id", "pad_token_id", "is_encoder_decoder",
    "num_decoder_layers", "output_past", "tie_word_embeddings", "use_cache", "n_positions",
    "classifier_dropout", "tokenizer_class", "scalable_attention", "is_decoder", "bos_token_id",
    "scale_decoder_outputs",
    "task_specific_params", "gradient_checkpointing",
})
_BLOCK_KEY = re.compile(r"^encoder\.block\.(\d+)\.")
_BIAS_KEY = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Shape of a T5 encoder (Hugging Face key names).

    ``model_type`` ``"t5"`` (v1.1: block 0 holds the relative position bias and
    every block reuses it) or ``"umt5"`` (one bias per block).
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    model_type: str = "t5"
    dense_act_fn: str = "gelu_pytorch_tanh"
    is_gated_act: bool = True
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        if self.dense_act_fn not in T5_ACTIVATIONS:
            raise ConfigError(f"dense_act_fn {self.dense_act_fn!r} is not one of {T5_ACTIVATIONS}")
        if not isinstance(self.is_gated_act, bool):
            raise ConfigError(f"is_gated_act must be true or false, got {self.is_gated_act!r}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ConfigError(f"layer_norm_epsilon must be a positive number, got {eps!r}")

    # transformers' attribute aliases (T5Config.attribute_map); the CLIP encode path reads these.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def inner_dim(self) -> int:
        """Width of q, k, v: ``num_heads * d_kv``."""
        return self.num_heads * self.d_kv

    @property
    def projection_dim(self) -> None:
        """T5 has no text projection (the shared loader asks whether CLIP's is the identity)."""
        return None


def _feed_forward_proj(data: dict, source: str) -> dict:
    """transformers' ``feed_forward_proj`` ("gated-gelu", "relu") → ``dense_act_fn`` + ``is_gated_act``."""
    proj = data.pop("feed_forward_proj", None)
    if proj is None:
        return data
    if not isinstance(proj, str) or proj.split("-")[-1] not in ("gelu", "relu"):
        raise ConfigError(f"{source}: feed_forward_proj {proj!r} is not gelu, relu, gated-gelu or gated-relu")
    gated = proj.startswith("gated-")
    # transformers maps "gated-gelu" to gelu_new (tanh GELU); plain "gelu" is the erf GELU, which ComfyUI lacks.
    if proj == "gelu":
        raise ConfigError(f"{source}: feed_forward_proj 'gelu' (erf GELU, T5 v1.0 style) is not supported; "
                          "T5 v1.1 and UMT5 use 'gated-gelu'")
    data.setdefault("dense_act_fn", "gelu_new" if proj.endswith("gelu") else "relu")
    data.setdefault("is_gated_act", gated)
    return data


def load_t5_config(spec: str | Path | Mapping[str, Any] | T5Config) -> T5Config:
    """Load a T5 config from a bundled name (``t5_xxl``, ``umt5_xxl``), a JSON path, a dict or a config.

    Raises:
        ConfigError: unreadable file, unknown or missing key, bad value (naming the file and key).
    """
    if isinstance(spec, T5Config):
        return spec
    raw, source = _read(spec)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a config must be a JSON object, got {type(raw).__name__}")
    data = _feed_forward_proj(dict(raw), source)
    fields = {f.name: f for f in dataclasses.fields(T5Config)}
    unknown = sorted(set(data) - set(fields) - IGNORED_HF_KEYS - _IGNORED_T5_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s) {unknown}; known keys are {sorted(fields)}")
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in data]
    if missing:
        raise ConfigError(f"{source}: missing config key(s) {missing}")
    try:
        return T5Config(**{k: v for k, v in data.items() if k in fields})
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _shape(sd: Mapping[str, torch.Tensor], key: str, dims: int, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{source}: T5 weight {key!r} is missing; the file is truncated or not a T5 v1.1 / "
                              "UMT5 encoder in the Hugging Face layout (shared.weight, encoder.block.N.layer...)")
    shape = tuple(sd[key].shape)
    if len(shape) != dims:
        raise CheckpointError(f"{source}: T5 tensor {key!r} has shape {shape}, expected {dims} dimensions")
    return shape


#: UMT5-XXL's vocabulary: tells a one-block UMT5 from T5 v1.1 (the bias pattern cannot).
_UMT5_VOCAB = 256384


def _model_type(sd: Mapping[str, torch.Tensor], num_layers: int, vocab_size: int, source: str) -> str:
    """T5 v1.1 keeps the position bias in block 0 only; UMT5 has one per block."""
    with_bias = [i for i in range(num_layers) if _BIAS_KEY.format(i) in sd]
    if num_layers == 1:
        return "umt5" if vocab_size == _UMT5_VOCAB else "t5"
    if with_bias == [0]:
        return "t5"
    if with_bias == list(range(num_layers)):
        return "umt5"
    raise CheckpointError(f"{source}: relative position bias in blocks {with_bias} of {num_layers}; T5 v1.1 "
                          "has it in block 0 only and UMT5 in every block; the file is malformed")


def t5_config_from_state_dict(sd: Mapping[str, torch.Tensor], *, source: str = "T5 state dict") -> T5Config:
    """The :class:`T5Config` an HF-layout T5 encoder state dict was built with: textenc's one
    reader of T5 shapes (:func:`textenc.loading.t5_files.detect_t5_shapes` reports its result).

    Heads come from the width of block 0's ``relative_attention_bias`` (buckets x heads),
    ``d_kv`` from the q projection, the layer count from the block numbers (which must run
    0..n-1), and UMT5 from a bias in every block (T5 v1.1 has one in block 0 only).

    Raises:
        CheckpointError: a key needed to read the shapes is missing or misshaped, the blocks
            are not numbered 0..n-1, or the biases sit in neither model's pattern; the
            message starts with ``source``.
    """
    vocab, d_model = _shape(sd, "shared.weight", 2, source)
    inner, _ = _shape(sd, "encoder.block.0.layer.0.SelfAttention.q.weight", 2, source)
    buckets, heads = _shape(sd, _BIAS_KEY.format(0), 2, source)
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    d_ff, _ = _shape(sd, "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight", 2,
                     source)
    layers = sorted({int(m.group(1)) for m in map(_BLOCK_KEY.match, sd) if m})
    if layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: encoder blocks {layers[:8]}... are not numbered 0..n-1; "
                              "the file is truncated or merged badly")
    if heads == 0 or inner % heads:
        raise CheckpointError(f"{source}: attention width {inner} is not a multiple of the {heads} heads of "
                              "relative_attention_bias")
    try:
        config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=len(layers),
                          num_heads=heads, model_type=_model_type(sd, len(layers), vocab, source),
                          is_gated_act=gated, dense_act_fn="gelu_pytorch_tanh" if gated else "relu",
                          relative_attention_num_buckets=buckets)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: T5 shapes do not make a valid config: {exc}") from None
    return config


def released_t5_name(config: T5Config) -> str | None:
    """The bundled name (``t5_xxl``, ``umt5_xxl``) whose shapes ``config`` has, else None.

    >>> released_t5_name(load_t5_config("umt5_xxl"))
    'umt5_xxl'
    """
    for name in T5_CONFIG_NAMES:
        if load_t5_config(name) == config:
            return name
    return None
