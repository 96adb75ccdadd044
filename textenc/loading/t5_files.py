"""Find a T5 / UMT5 encoder in any file people have and convert it to the HF key layout.

Sources: a T5 safetensors (``t5xxl_fp16.safetensors``, ``umt5_xxl_fp16.safetensors``, fp8,
ComfyUI's scaled fp8), a single-file SD3/SD3.5 checkpoint (keys under
``text_encoders.t5xxl.transformer.``), a diffusers ``T5EncoderModel`` folder
(``text_encoder_2`` / ``text_encoder_3``, sharded or not, see
:mod:`textenc.loading.t5_folders`) and GGUF (:mod:`textenc.loading.gguf_files`).

The result is always the HF layout the T5 model loads (``shared.weight``,
``encoder.block.{i}.layer.0.SelfAttention.q.weight``, ...), with weights in their stored
dtype, memory-mapped: quantised ones as :class:`~textenc.nn.packed.PackedWeight`, decoded
per Linear at call time. The config is read from the shapes; T5 v1.1 and UMT5 differ in
where the relative position bias lives (block 0 only, or every block).

>>> t5_layout_keys(T5Shapes("t5", 8, 16, 2, 4, 1, 10, 32))[:2]
['shared.weight', 'encoder.final_layer_norm.weight']
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from textenc.errors import CheckpointError
from textenc.loading.checkpoint import aligned, is_finite, load_state_dict, read_safetensors_metadata
from textenc.loading.gguf_files import read_gguf_t5
from textenc.loading.quantized import is_quantized, unpack_quantized
from textenc.loading.t5_folders import check_folder_config, read_t5_folder
from textenc.nn.packed import PackedWeight, ScaledFloat8Weight, float8_is_finite
from textenc.nn.t5_config import t5_config_from_state_dict

__all__ = ["T5Shapes", "T5Checkpoint", "KNOWN_CONFIGS", "load_t5_file", "t5_checkpoint",
           "detect_t5_shapes", "t5_layout_keys"]


@dataclass(frozen=True)
class T5Shapes:
    """A T5 encoder's config, as read from its weights' shapes.

    Attributes:
        kind: ``"t5"`` (v1.1: position bias in block 0 only) or ``"umt5"`` (one per block).
        d_model, d_ff, num_heads, d_kv, num_layers, vocab_size: HF ``T5Config`` names.
        num_buckets: Relative-attention buckets (32 in every released model).
    """

    kind: str
    d_model: int
    d_ff: int
    num_heads: int
    d_kv: int
    num_layers: int
    vocab_size: int
    num_buckets: int

    @property
    def name(self) -> str | None:
        """The released model these shapes are (``"t5-v1_1-xxl"``, ``"umt5-xxl"``), else ``None``."""
        return next((name for name, shapes in KNOWN_CONFIGS.items() if shapes == self), None)

    def hf_config(self) -> dict[str, object]:
        """Keyword arguments for transformers' ``T5Config`` / ``UMT5Config``."""
        return {"model_type": self.kind, "d_model": self.d_model, "d_ff": self.d_ff,
                "num_heads": self.num_heads, "d_kv": self.d_kv, "num_layers": self.num_layers,
                "vocab_size": self.vocab_size, "relative_attention_num_buckets": self.num_buckets,
                "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
                "layer_norm_epsilon": 1e-6, "is_encoder_decoder": False}


#: Released encoders, recognised by name (ComfyUI's t5_config_xxl.json / umt5_config_xxl.json).
KNOWN_CONFIGS = {
    "t5-v1_1-xxl": T5Shapes("t5", 4096, 10240, 64, 64, 24, 32128, 32),
    "umt5-xxl": T5Shapes("umt5", 4096, 10240, 64, 64, 24, 256384, 32),
}


@dataclass
class T5Checkpoint:
    """A T5 encoder read from a file.

    Attributes:
        state_dict: HF-layout weights (stored dtype, memory-mapped, packed where quantised).
        shapes: The config read from them.
        source: The file or folder.
        spiece_model: The SentencePiece model bytes UMT5 files carry (``spiece_model``), or None.
        ignored: Keys that are not part of the encoder (decoder, LM head, other models'
            weights in a single-file checkpoint).
    """

    state_dict: dict[str, torch.Tensor]
    shapes: T5Shapes
    source: str
    spiece_model: bytes | None = None
    ignored: tuple[str, ...] = field(default=())

    def for_compute(self, compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """:attr:`state_dict` ready for ``load_state_dict(..., assign=True)``.

        Weights already in ``compute_dtype`` are used as they are, so they are made
        64-byte aligned (:func:`~textenc.loading.checkpoint.aligned`: CPU kernels round
        differently on unaligned views). All others stay memory-mapped: their per-call
        cast or decode is a fresh, aligned tensor, and aligning them would copy the model.
        """
        used_as_is = {k: v for k, v in self.state_dict.items()
                      if v.dtype == compute_dtype and not isinstance(v, PackedWeight)}
        return {**self.state_dict, **aligned(used_as_is)}


_ATTENTION = ("q", "k", "v", "o")
_FFN = ("wi_0", "wi_1", "wo")
_FINAL_NORM = "encoder.final_layer_norm.weight"
_LINEAR_WEIGHTS = tuple(f".{name}.weight" for name in _ATTENTION + _FFN)
#: A full T5ForConditionalGeneration (or a GGUF of one) also holds these; they are not the encoder.
_NOT_ENCODER = ("decoder.", "lm_head.", "encoder.embed_tokens.")


def load_t5_file(path: str | os.PathLike[str], *, require_finite: bool = True) -> T5Checkpoint:
    """Read a T5 / UMT5 encoder from a file or a diffusers folder.

    Args:
        path: ``.safetensors`` (plain, fp8, scaled fp8, comfy_quant, SD3 single-file),
            ``.gguf``, a weights-only ``.bin``/``.pt``, or a diffusers ``T5EncoderModel``
            folder (or the pipeline folder holding one).
        require_finite: Refuse NaN or infinite weights (decoded values for packed ones).

    Raises:
        CheckpointError: unreadable or hostile file, no T5 encoder in it, an unsupported
            quantisation, a non-gated (v1.0) T5, or shapes that do not fit together.
    """
    file = Path(path)
    if file.is_dir():
        state_dict, metadata = read_t5_folder(file), {}
    elif file.suffix.lower() == ".gguf":
        state_dict, metadata = read_gguf_t5(file), {}
    else:
        state_dict = load_state_dict(file)
        metadata = read_safetensors_metadata(file) if file.suffix.lower() == ".safetensors" else {}
    checkpoint = t5_checkpoint(state_dict, metadata, source=str(file), require_finite=require_finite)
    if file.is_dir():
        check_folder_config(file, vars(checkpoint.shapes))
    return checkpoint


def t5_checkpoint(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
                  source: str, require_finite: bool = True) -> T5Checkpoint:
    """Find the encoder in an already-read state dict; see :func:`load_t5_file`."""
    prefix = _encoder_prefix(state_dict, source)
    spiece = state_dict.get(f"{prefix}spiece_model", state_dict.get("spiece_model"))
    ours = {k: v for k, v in state_dict.items() if k.startswith(prefix) and not k.endswith("spiece_model")}
    ignored = tuple(k for k in state_dict if not k.startswith(prefix) and k != "spiece_model")
    if is_quantized(ours, metadata or {}):
        # Quantised layers are named by full key (header metadata included): unpack first.
        ours = unpack_quantized(ours, metadata or {}, source=source)
    ours = {k[len(prefix):]: v for k, v in ours.items()}
    if "shared.weight" not in ours and "encoder.embed_tokens.weight" in ours:
        ours["shared.weight"] = ours["encoder.embed_tokens.weight"]
    ignored += tuple(prefix + k for k in ours if k.startswith(_NOT_ENCODER))
    ours = {k: v for k, v in ours.items() if not k.startswith(_NOT_ENCODER)}
    scaled = [k for k, v in ours.items() if isinstance(v, ScaledFloat8Weight) and not k.endswith(_LINEAR_WEIGHTS)]
    if scaled:
        # ComfyUI's quantised ops are Linear only: it would load these raw, ignoring the scale.
        raise CheckpointError(f"{source}: {scaled[:4]} carry a float8 scale, but only Linear weights are "
                              "quantised in ComfyUI's format (it would read them unscaled); the file is malformed")
    shapes = detect_t5_shapes(ours, source=source)
    _check_layout(ours, shapes, source)
    _check_values(ours, source, require_finite)
    return T5Checkpoint(ours, shapes, source, _spiece_bytes(spiece, source), ignored)


def _encoder_prefix(state_dict: Mapping[str, torch.Tensor], source: str) -> str:
    """The key prefix in front of ``encoder.final_layer_norm.weight`` (``""`` for a plain file)."""
    prefixes = {k[:-len(_FINAL_NORM)] for k in state_dict
                if k.endswith(_FINAL_NORM) and (k == _FINAL_NORM or k[-len(_FINAL_NORM) - 1] == ".")}
    if len(prefixes) == 1:
        return prefixes.pop()
    if prefixes:
        raise CheckpointError(f"{source}: holds {len(prefixes)} T5 encoders (under {sorted(prefixes)}); "
                              "extract the one you want into its own file")
    sample = sorted(state_dict)[:6]
    raise CheckpointError(f"{source}: no T5 encoder found (no {_FINAL_NORM!r} under any prefix; "
                          f"{len(state_dict)} keys such as {sample}); pass a T5 / UMT5 text encoder file")


def detect_t5_shapes(sd: Mapping[str, torch.Tensor], *, source: str) -> T5Shapes:
    """Read a T5 config from HF-layout weights' shapes (one reader for all of textenc:
    :func:`textenc.nn.t5_config.t5_config_from_state_dict`); see :class:`T5Shapes`.

    Raises:
        CheckpointError: a weight needed to read a size is missing, the feed-forward is
            not gated (T5 v1.0's ``wi``), the blocks are not numbered 0..n-1, or the position
            biases sit in a pattern that is neither T5 v1.1 nor UMT5.
    """
    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in sd:
        raise CheckpointError(f"{source}: a T5 v1.0 encoder (feed-forward 'wi', ReLU); textenc runs T5 v1.1 "
                              "and UMT5 (gated-GELU 'wi_0'/'wi_1'), as ComfyUI's Flux/SD3/Wan encoders")
    config = t5_config_from_state_dict(sd, source=source)
    return T5Shapes(config.model_type, config.d_model, config.d_ff, config.num_heads, config.d_kv,
                    config.num_layers, config.vocab_size, config.relative_attention_num_buckets)


def t5_layout_keys(shapes: T5Shapes) -> list[str]:
    """Every HF-layout key a T5 encoder with ``shapes`` has."""
    return list(_expected_shapes(shapes))


def _expected_shapes(s: T5Shapes) -> dict[str, tuple[int, ...]]:
    inner = s.num_heads * s.d_kv
    out = {"shared.weight": (s.vocab_size, s.d_model), _FINAL_NORM: (s.d_model,)}
    for i in range(s.num_layers):
        block = f"encoder.block.{i}.layer"
        out.update({f"{block}.0.SelfAttention.{n}.weight": (s.d_model, inner) if n == "o" else (inner, s.d_model)
                    for n in _ATTENTION})
        if i == 0 or s.kind == "umt5":
            out[f"{block}.0.SelfAttention.relative_attention_bias.weight"] = (s.num_buckets, s.num_heads)
        out[f"{block}.0.layer_norm.weight"] = (s.d_model,)
        out.update({f"{block}.1.DenseReluDense.{n}.weight": (s.d_model, s.d_ff) if n == "wo" else (s.d_ff, s.d_model)
                    for n in _FFN})
        out[f"{block}.1.layer_norm.weight"] = (s.d_model,)
    return out


def _check_layout(sd: Mapping[str, torch.Tensor], shapes: T5Shapes, source: str) -> None:
    expected = _expected_shapes(shapes)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: {tuple(sd[k].shape)} (expected {v})" for k, v in expected.items()
             if k in sd and tuple(sd[k].shape) != v]
    for problems, what in ((missing, "missing"), (unexpected, "unexpected"), (wrong, "misshaped")):
        if problems:
            raise CheckpointError(f"{source}: {len(problems)} {what} T5 weight(s) for {shapes}: {problems[:4]}; "
                                  "the file is truncated, merged badly or not a T5 encoder")


def _check_values(sd: Mapping[str, torch.Tensor], source: str, require_finite: bool) -> None:
    for key, tensor in sd.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: T5 weight {key!r} has dtype {tensor.dtype}; weights are floating "
                                  "point; the file is corrupt or not a text encoder")
        if require_finite and not _finite(tensor):
            raise CheckpointError(f"{source}: T5 weight {key!r} holds NaN or infinite values; the file is "
                                  "corrupt; use another copy (require_finite=False loads it anyway)")


def _finite(tensor: torch.Tensor, rows_per_chunk: int = 1024) -> bool:
    """Finite check without a float copy of the weight: packed weights decode a chunk at a
    time; float8 bit patterns are checked directly (``is_finite`` would widen to fp32)."""
    if isinstance(tensor, PackedWeight):
        return tensor.is_finite(rows_per_chunk=rows_per_chunk)
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return float8_is_finite(tensor, rows_per_chunk=rows_per_chunk)
    return is_finite(tensor)


def _spiece_bytes(tensor: torch.Tensor | None, source: str) -> bytes | None:
    if tensor is None:
        return None
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise CheckpointError(f"{source}: 'spiece_model' must be a 1-D uint8 tensor (a SentencePiece model), "
                              f"got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor.numpy().tobytes()
