"""Test helper: tiny T5 / UMT5 encoders in the real key layouts, written in every file format.

Weights come from transformers' ``T5EncoderModel`` / ``UMT5EncoderModel`` on a tiny
config (random init, fixed seed). GGUF files are written with the ``gguf`` package's
``GGUFWriter``, tensor names from gguf's own ``MODEL_ARCH.T5ENCODER`` name map (not
textenc's table), quantised with ``gguf.quants.quantize`` where gguf can, else filled with
random block bytes (every byte at most 0x3B, so each fp16/fp8 scale field in a block is
finite); the reference values are always ``gguf.quants.dequantize`` of the stored bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

# d_model and d_ff multiples of 256 so every Linear row holds whole K-quant blocks.
TINY = dict(d_model=256, d_ff=512, num_heads=4, d_kv=64, num_layers=2, vocab_size=64,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
            relative_attention_max_distance=128)


def tiny_model(kind: str = "t5", seed: int = 0) -> torch.nn.Module:
    """transformers' encoder (``kind`` ``"t5"`` or ``"umt5"``) on the tiny config, fp32."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
    torch.manual_seed(seed)
    if kind == "umt5":
        return UMT5EncoderModel(UMT5Config(**TINY)).eval()
    return T5EncoderModel(T5Config(**TINY)).eval()


def comfy_state_dict(kind: str = "t5", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The HF layout as ComfyUI's T5 files hold it (``shared.weight``, no tied copy)."""
    sd = tiny_model(kind).state_dict()
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items() if k != "encoder.embed_tokens.weight"}


def is_linear_key(key: str) -> bool:
    return key.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight"))


def save_safetensors(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(sd, str(path), metadata=metadata)
    return path


def scaled_fp8(sd: dict[str, torch.Tensor], fp8: torch.dtype = torch.float8_e4m3fn, *, legacy: bool = True,
               prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``sd`` with every Linear stored as fp8 / scale, in the legacy (``scaled_fp8``,
    ``scale_weight``) or the per-layer (``weight_scale``, ``comfy_quant``) form.

    Returns the file's tensors and, per Linear key, its (raw fp8, scale)."""
    out, packed = {}, {}
    for key, value in sd.items():
        if not is_linear_key(key):
            out[prefix + key] = value
            continue
        layer = prefix + key[:-len(".weight")]
        scale = (value.abs().amax().float() / torch.finfo(fp8).max).reshape(())
        raw = (value.float() / scale).to(fp8)
        out[f"{layer}.weight"] = raw
        packed[key] = (raw, scale)
        if legacy:
            out[f"{layer}.scale_weight"] = scale
            out[f"{layer}.scale_input"] = torch.tensor(1.0)
        else:
            out[f"{layer}.weight_scale"] = scale
            out[f"{layer}.comfy_quant"] = comfy_quant_tensor({"format": str(fp8).split(".")[-1]})
    if legacy:
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=fp8)
    return out, packed


def comfy_quant_tensor(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def gguf_name(hf_key: str, num_layers: int) -> str:
    """gguf's own llama.cpp name for an HF T5 key (``gguf.get_tensor_name_map``)."""
    import gguf
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, num_layers)
    stem, _, leaf = hf_key.rpartition(".")
    found = names.get_name(stem)
    assert found is not None, hf_key
    return f"{found}.{leaf}"


def quantized_bytes(values: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """``values`` quantised by gguf where it can; else random valid block bytes."""
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES
    try:
        return quants.quantize(values, qtype)
    except NotImplementedError:
        block, size = GGML_QUANT_SIZES[qtype]
        shape = (values.shape[0], values.shape[1] // block * size)
        return rng.integers(0, 0x3C, size=shape, dtype=np.uint8)


def write_gguf(path: Path, sd: dict[str, torch.Tensor], qtype, *, arch: str = "t5encoder",
               embed_qtype=None) -> dict[str, np.ndarray]:
    """Write ``sd`` (fp32) as GGUF: Linear weights (and the embedding, with ``embed_qtype``)
    in ``qtype``, norms F32, position biases F16. Returns the reference values per HF key."""
    import gguf
    from gguf import GGMLQuantizationType as Q, quants
    rng = np.random.default_rng(0)
    num_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    writer = gguf.GGUFWriter(str(path), arch)
    reference = {}
    for key, value in sd.items():
        array = value.float().numpy()
        if is_linear_key(key) or (key == "shared.weight" and embed_qtype is not None):
            kind = qtype if key != "shared.weight" else embed_qtype
        elif "relative_attention_bias" in key:
            kind = Q.F16
        else:
            kind = Q.F32
        stored = quantized_bytes(array, kind, rng) if kind not in (Q.F32, Q.F16) else \
            array.astype(np.float16 if kind == Q.F16 else np.float32)
        writer.add_tensor(gguf_name(key, num_layers), stored, raw_dtype=kind if stored.dtype == np.uint8 else None)
        reference[key] = quants.dequantize(stored, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference
