"""T5 / UMT5 encoders from every file format: detection, conversion to the HF layout, and
weights equal to the reference decoding bit for bit (fp16/bf16/fp32, fp8, ComfyUI's scaled
fp8 and comfy_quant, diffusers folders, SD3 single files, GGUF)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from t5_fixtures import (TINY, comfy_quant_tensor, comfy_state_dict, is_linear_key, save_safetensors,
                         scaled_fp8, tiny_model, write_gguf)
from textenc.errors import CheckpointError
from textenc.loading.checkpoint import aligned
from textenc.loading.t5_files import KNOWN_CONFIGS, T5Shapes, detect_t5_shapes, load_t5_file, t5_layout_keys
from textenc.nn import ops
from textenc.nn.packed import PackedWeight, ScaledFloat8Weight

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1
                                                                      else a, b.view(torch.uint8)
                                                                      if b.dtype.itemsize == 1 else b)


def _linear_matches(weight: torch.Tensor, reference: torch.Tensor, dtype=torch.float32) -> None:
    """A manual-cast Linear holding ``weight`` computes F.linear with ``reference`` exactly."""
    layer = ops.manual_cast.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float16)
    layer.load_state_dict({"weight": weight}, assign=True)
    x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, reference.to(dtype)))


@pytest.mark.parametrize("kind", ["t5", "umt5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_plain_safetensors_load_bit_exact(tmp_path, kind, dtype):
    sd = comfy_state_dict(kind, dtype)
    checkpoint = load_t5_file(save_safetensors(tmp_path / "t5.safetensors", sd))
    assert checkpoint.shapes == T5Shapes(kind, 256, 512, 4, 64, 2, 64, 32)
    assert set(checkpoint.state_dict) == set(sd) == set(t5_layout_keys(checkpoint.shapes))
    for key, value in sd.items():
        assert _bits_equal(checkpoint.state_dict[key], value), key


@pytest.mark.parametrize("kind", ["t5", "umt5"])
def test_hf_config_matches_transformers(kind):
    shapes = detect_t5_shapes(comfy_state_dict(kind), source="tiny")
    config = tiny_model(kind).config
    for name, value in shapes.hf_config().items():
        if name not in ("model_type", "is_encoder_decoder"):
            assert getattr(config, name) == value, name
    assert shapes.hf_config()["model_type"] == config.model_type


@pytest.mark.parametrize("name", list(KNOWN_CONFIGS))
def test_released_xxl_configs_are_recognised(name):
    known = KNOWN_CONFIGS[name]
    inner = known.num_heads * known.d_kv
    sd = {"shared.weight": (known.vocab_size, known.d_model)}
    for i in range(known.num_layers):
        sd[f"encoder.block.{i}.layer.0.SelfAttention.q.weight"] = (inner, known.d_model)
        sd[f"encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"] = (known.d_ff, known.d_model)
        if i == 0 or known.kind == "umt5":
            sd[f"encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"] = (32, known.num_heads)
    shapes = detect_t5_shapes({k: torch.empty(v, device="meta") for k, v in sd.items()}, source="meta")
    assert shapes == known and shapes.name == name


def test_sd3_single_file_prefix(tmp_path):
    sd = comfy_state_dict("t5", torch.float16)
    other = {"model.diffusion_model.x.weight": torch.ones(2),
             "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(4)}
    file = {**{f"text_encoders.t5xxl.transformer.{k}": v for k, v in sd.items()}, **other}
    checkpoint = load_t5_file(save_safetensors(tmp_path / "sd3.safetensors", file))
    assert set(checkpoint.ignored) == set(other)
    assert all(_bits_equal(checkpoint.state_dict[k], v) for k, v in sd.items())


@pytest.mark.parametrize("kind", ["t5", "umt5"])
def test_diffusers_folder_sharded(tmp_path, kind):
    model = tiny_model(kind)
    folder = tmp_path / "text_encoder_2"
    model.save_pretrained(folder, max_shard_size="300KB", safe_serialization=True)
    assert (folder / "model.safetensors.index.json").is_file()
    checkpoint = load_t5_file(folder)
    reference = model.state_dict()
    assert set(checkpoint.state_dict) == set(t5_layout_keys(checkpoint.shapes))
    for key, value in checkpoint.state_dict.items():
        assert torch.equal(value, reference[key]), key
    # The pipeline folder above it works too.
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert load_t5_file(tmp_path).shapes == checkpoint.shapes


def test_umt5_spiece_model_is_returned_and_stripped(tmp_path):
    sd = comfy_state_dict("umt5", torch.float16)
    blob = b"\x0a\x03abc"
    sd["spiece_model"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    checkpoint = load_t5_file(save_safetensors(tmp_path / "umt5.safetensors", sd))
    assert checkpoint.spiece_model == blob and "spiece_model" not in checkpoint.state_dict


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_plain_fp8_weights(tmp_path, fp8):
    sd = {k: (v.to(fp8) if is_linear_key(k) else v) for k, v in comfy_state_dict().items()}
    checkpoint = load_t5_file(save_safetensors(tmp_path / "fp8.safetensors", sd))
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    assert _bits_equal(checkpoint.state_dict[key], sd[key])
    _linear_matches(checkpoint.state_dict[key], sd[key].float())


@pytest.mark.parametrize("legacy", [True, False], ids=["scaled_fp8", "comfy_quant"])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_scaled_fp8_decodes_as_comfyui(tmp_path, legacy, fp8):
    if legacy and fp8 == torch.float8_e5m2:
        pytest.skip("ComfyUI reads every legacy scaled_fp8 layer as float8_e4m3fn")
    file, packed = scaled_fp8(comfy_state_dict(), fp8, legacy=legacy, prefix="text_encoders.t5xxl.transformer.")
    checkpoint = load_t5_file(save_safetensors(tmp_path / "scaled.safetensors", file))
    for key, (raw, scale) in packed.items():
        weight = checkpoint.state_dict[key]
        assert isinstance(weight, ScaledFloat8Weight) and _bits_equal(weight.raw, raw)
        for dtype in (torch.float32, torch.bfloat16):
            # comfy_kitchen dequantize_per_tensor_fp8: x.to(dtype) * scale.to(dtype).
            assert torch.equal(weight.decode(dtype), raw.to(dtype) * scale.to(dtype))
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    raw, scale = packed[key]
    _linear_matches(checkpoint.state_dict[key], raw.float() * scale.float())
    _linear_matches(checkpoint.state_dict[key], raw.to(torch.bfloat16) * scale.to(torch.bfloat16), torch.bfloat16)


def test_quantization_metadata_in_header(tmp_path):
    file, packed = scaled_fp8(comfy_state_dict(), legacy=False)
    layers = {}
    for key in [k for k in file if k.endswith(".comfy_quant")]:
        layers[key[:-len(".comfy_quant")]] = json.loads(bytes(file.pop(key).tolist()))
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    checkpoint = load_t5_file(save_safetensors(tmp_path / "meta.safetensors", file, metadata))
    key, (raw, scale) = next(iter(packed.items()))
    assert torch.equal(checkpoint.state_dict[key].decode(), raw.float() * scale)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8", "int8_tensorwise", "int8_convrot"])
def test_newer_quant_formats_are_refused_by_name(tmp_path, fmt):
    file, _ = scaled_fp8(comfy_state_dict(), legacy=False)
    file["encoder.block.0.layer.0.SelfAttention.q.comfy_quant"] = comfy_quant_tensor({"format": fmt})
    with pytest.raises(CheckpointError, match=fmt):
        load_t5_file(save_safetensors(tmp_path / "new.safetensors", file))


def test_packed_weights_load_into_ops_layers_and_aligned_keeps_them():
    raw = torch.randn(8, 4).to(torch.float8_e4m3fn)
    weight = ScaledFloat8Weight(raw, torch.tensor(0.25))
    embedding = ops.manual_cast.Embedding(8, 4, dtype=torch.float16)
    embedding.load_state_dict(aligned({"weight": weight}), assign=True)
    ids = torch.tensor([[3, 1, 3]])
    assert isinstance(embedding.weight, PackedWeight)
    assert torch.equal(embedding(ids), (raw.float() * 0.25)[ids])


GGUF_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
              Q.IQ4_NL, Q.IQ4_XS, Q.TQ2_0, Q.BF16, Q.F16, Q.F32]


@pytest.mark.parametrize("qtype", GGUF_TYPES, ids=lambda q: q.name)
def test_gguf_decodes_as_gguf_does(tmp_path, qtype):
    sd = comfy_state_dict("t5")
    path = tmp_path / f"t5-{qtype.name}.gguf"
    reference = write_gguf(path, sd, qtype, embed_qtype=Q.Q8_0)
    checkpoint = load_t5_file(path)
    assert checkpoint.shapes == detect_t5_shapes(sd, source="tiny")
    for key, expected in reference.items():
        value = checkpoint.state_dict[key]
        decoded = value.decode() if isinstance(value, PackedWeight) else value.float()
        assert np.array_equal(decoded.numpy(), expected.reshape(decoded.shape)), key
    key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    _linear_matches(checkpoint.state_dict[key], torch.from_numpy(reference[key]))
    ids = torch.tensor([[5, 0, 63, 5]])
    embedding = ops.manual_cast.Embedding(64, 256)
    embedding.load_state_dict({"weight": checkpoint.state_dict["shared.weight"]}, assign=True)
    assert torch.equal(embedding(ids), torch.from_numpy(reference["shared.weight"])[ids])


def test_gguf_umt5_position_bias_per_block(tmp_path):
    path = tmp_path / "umt5.gguf"
    write_gguf(path, comfy_state_dict("umt5"), Q.Q8_0)
    assert load_t5_file(path).shapes.kind == "umt5"


def test_gguf_names_follow_gguf_tables():
    from t5_fixtures import gguf_name
    from textenc.loading.gguf_files import gguf_to_hf_name
    keys = t5_layout_keys(T5Shapes("umt5", 8, 16, 2, 4, 3, 10, 32))
    assert all(gguf_to_hf_name(gguf_name(key, 3)) == key for key in keys)


def test_tiny_config_is_what_the_fixtures_use():
    assert TINY["d_model"] % 256 == 0 and TINY["d_ff"] % 256 == 0


def test_module_doctests():
    import doctest

    from textenc.loading import gguf_files, t5_files
    from textenc.nn import packed
    for module in (packed, t5_files, gguf_files):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_for_compute_aligns_only_weights_used_uncast(tmp_path):
    sd = comfy_state_dict(dtype=torch.float16)
    sd["encoder.final_layer_norm.weight"] = sd["encoder.final_layer_norm.weight"].float()
    checkpoint = load_t5_file(save_safetensors(tmp_path / "t5.safetensors", sd))
    ready = checkpoint.for_compute(torch.float32)
    assert ready["encoder.final_layer_norm.weight"].data_ptr() % 64 == 0
    assert all(ready[k] is v for k, v in checkpoint.state_dict.items() if v.dtype == torch.float16)


@pytest.mark.parametrize("threads", [1, 2])
def test_decoding_is_the_same_at_1_and_2_threads(tmp_path, threads):
    sd = comfy_state_dict()
    reference = write_gguf(tmp_path / "q8.gguf", sd, Q.Q8_0, embed_qtype=Q.Q8_0)
    file, packed = scaled_fp8(sd)
    scaled = load_t5_file(save_safetensors(tmp_path / "s.safetensors", file))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q8 = load_t5_file(tmp_path / "q8.gguf")
        for key, expected in reference.items():
            value = q8.state_dict[key]
            decoded = value.decode() if isinstance(value, PackedWeight) else value.float()
            assert np.array_equal(decoded.numpy(), expected), key
        for key, (raw, scale) in packed.items():
            assert torch.equal(scaled.state_dict[key].decode(), raw.float() * scale)
    finally:
        torch.set_num_threads(before)
