"""Hostile and broken T5 files: every one is a CheckpointError naming the problem, fast,
without unpickling, reading outside the given folder or allocating what a header claims."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from t5_fixtures import comfy_quant_tensor, comfy_state_dict, save_safetensors, scaled_fp8, tiny_model, write_gguf
from textenc.errors import CheckpointError
from textenc.loading.t5_files import load_t5_file

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
Q_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "t5-Q8_0.gguf"
    write_gguf(path, comfy_state_dict(), Q.Q8_0)
    return path


def _header(n_tensors: int, n_fields: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_fields)


def _string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


@pytest.mark.parametrize("cut", [3, 20, 200, -100])
def test_truncated_gguf(tmp_path, good_gguf, cut):
    data = good_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(CheckpointError):
        load_t5_file(path)


@pytest.mark.parametrize("body,match", [
    (_header(0, 1) + _string("k") + struct.pack("<IIQ", 9, 0, 2**60), "array count"),
    (_header(0, 1) + _string("k") + struct.pack("<I", 8) + struct.pack("<Q", 2**62), "string length"),
    (_header(2**40, 0), "cannot fit"),
    (_header(1, 0) + _string("token_embd.weight") + struct.pack("<I", 9), "dimensions"),
    (_header(1, 0) + _string("token_embd.weight") + struct.pack("<IQQIQ", 2, 2**40, 2**40, 0, 0), "cannot fit"),
    (_header(0, 1) + _string("k") + struct.pack("<I", 99), "value type"),
    (b"GGUF" + struct.pack("<I", 7) + bytes(16), "version"),
])
def test_hostile_gguf_headers_are_refused_quickly(tmp_path, body, match):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(body + bytes(64))
    with pytest.raises(CheckpointError, match=match):
        load_t5_file(path)


def _gguf_with(tmp_path, tensors: dict, arch: str = "t5encoder"):
    path = tmp_path / "x.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_integer_tensor_is_refused_by_type(tmp_path):
    import numpy as np
    path = _gguf_with(tmp_path, {"token_embd.weight": (np.zeros((4, 8), dtype=np.int32), None)})
    with pytest.raises(CheckpointError, match="I32"):
        load_t5_file(path)


def test_gguf_other_architecture_is_refused(tmp_path):
    import numpy as np
    path = _gguf_with(tmp_path, {"token_embd.weight": (np.zeros((4, 8), dtype=np.float32), None)}, arch="llama")
    with pytest.raises(CheckpointError, match="llama"):
        load_t5_file(path)


def test_gguf_shapes_that_do_not_fit(tmp_path):
    sd = comfy_state_dict()
    sd[Q_KEY] = sd[Q_KEY][:, :128].contiguous()
    path = tmp_path / "misshaped.gguf"
    write_gguf(path, sd, Q.Q8_0)
    with pytest.raises(CheckpointError, match="misshaped"):
        load_t5_file(path)


def test_gguf_infinite_block_scale(tmp_path):
    import numpy as np
    sd = comfy_state_dict()
    path = tmp_path / "inf.gguf"
    write_gguf(path, sd, Q.Q8_0)
    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == "enc.blk.1.ffn_down.weight")
    data = bytearray(path.read_bytes())
    data[tensor.data_offset:tensor.data_offset + 2] = np.float16(np.inf).tobytes()  # first block's d
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ffn|wo.weight"):
        load_t5_file(path)
    assert load_t5_file(path, require_finite=False).shapes.num_layers == 2


@pytest.mark.parametrize("where", ["fp8 scale", "fp8 weight", "fp16 weight", "plain e4m3fn", "plain e5m2 inf"])
def test_nan_weights_are_refused(tmp_path, where):
    if where.startswith("plain"):
        fp8 = torch.float8_e5m2 if "e5m2" in where else torch.float8_e4m3fn
        file = {k: v.to(fp8) if k == Q_KEY else v for k, v in comfy_state_dict().items()}
        file[Q_KEY].view(torch.uint8)[3, 7] = 0x7C if "e5m2" in where else 0xFF  # +inf / -NaN
    elif where == "fp16 weight":
        file = comfy_state_dict(dtype=torch.float16)
        file[Q_KEY][0, 0] = float("nan")
    else:
        file, _ = scaled_fp8(comfy_state_dict())
        if where == "fp8 scale":
            file["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.tensor(float("nan"))
        else:
            file[Q_KEY].view(torch.uint8)[0, 0] = 0x7F  # e4m3fn NaN
    path = save_safetensors(tmp_path / "nan.safetensors", file)
    with pytest.raises(CheckpointError, match="NaN"):
        load_t5_file(path)
    if where != "fp8 scale":  # a NaN scale is refused always: it is the format's metadata
        assert load_t5_file(path, require_finite=False).shapes.num_layers == 2


def test_scale_that_overflows_float32_is_refused(tmp_path):
    file, _ = scaled_fp8(comfy_state_dict())
    file["encoder.block.1.layer.0.SelfAttention.v.scale_weight"] = torch.tensor(3e38)
    with pytest.raises(CheckpointError, match="SelfAttention.v"):
        load_t5_file(save_safetensors(tmp_path / "big.safetensors", file))


@pytest.mark.parametrize("change,match", [
    (lambda f: f.__setitem__("encoder.block.0.layer.0.SelfAttention.q.comfy_quant",
                             torch.tensor(list(b"{not json"), dtype=torch.uint8)), "not JSON"),
    (lambda f: f.__setitem__("encoder.block.0.layer.0.SelfAttention.q.weight_scale", torch.ones(2)), "one floating"),
    (lambda f: f.pop("encoder.block.0.layer.0.SelfAttention.q.weight_scale"), "weight_scale"),
    (lambda f: f.__setitem__(Q_KEY, f[Q_KEY].to(torch.float16)), "float8_e4m3fn"),
    (lambda f: f.pop("encoder.block.0.layer.0.SelfAttention.q.comfy_quant"), "belong to no quantised layer"),
    (lambda f: f.__setitem__("encoder.block.0.layer.0.SelfAttention.q.comfy_quant",
                             comfy_quant_tensor({"fmt": 1})), "format"),
])
def test_bad_quantisation_metadata(tmp_path, change, match):
    file, _ = scaled_fp8(comfy_state_dict(), legacy=False)
    change(file)
    with pytest.raises(CheckpointError, match=match):
        load_t5_file(save_safetensors(tmp_path / "q.safetensors", file))


def test_scaled_embedding_is_refused(tmp_path):
    file, _ = scaled_fp8(comfy_state_dict(), legacy=False)
    file["shared.weight"] = file["shared.weight"].to(torch.float8_e4m3fn)
    file["shared.weight_scale"] = torch.tensor(0.5)
    file["shared.comfy_quant"] = comfy_quant_tensor({"format": "float8_e4m3fn"})
    with pytest.raises(CheckpointError, match="only Linear"):
        load_t5_file(save_safetensors(tmp_path / "q.safetensors", file))


def test_bad_header_quantization_metadata(tmp_path):
    file, _ = scaled_fp8(comfy_state_dict(), legacy=False)
    for key in [k for k in file if k.endswith(".comfy_quant")]:
        file.pop(key)
    path = save_safetensors(tmp_path / "q.safetensors", file, {"_quantization_metadata": "[1, 2"})
    with pytest.raises(CheckpointError, match="_quantization_metadata"):
        load_t5_file(path)


@pytest.mark.parametrize("change,match", [
    (lambda sd: {"text_model.final_layer_norm.weight": torch.ones(4)}, "no T5 encoder found"),
    (lambda sd: {**sd, **{f"a.{k}": v for k, v in sd.items()}}, "2 T5 encoders"),
    (lambda sd: {**sd, "encoder.block.0.layer.1.DenseReluDense.wi.weight": torch.ones(512, 256)}, "v1.0"),
    (lambda sd: {k: v for k, v in sd.items() if "block.1.layer.1.layer_norm" not in k}, "missing"),
    (lambda sd: {**sd, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": torch.ones(32, 4),
                 **{k.replace("block.1.", "block.2."): v for k, v in sd.items() if "block.1." in k}},
     "relative position bias"),
    (lambda sd: {**sd, "encoder.block.0.extra.weight": torch.ones(2)}, "unexpected"),
    (lambda sd: {**sd, "shared.weight": torch.zeros(64, 256, dtype=torch.int32)}, "dtype"),
    (lambda sd: {k: v for k, v in sd.items() if "block.1." not in k or "block.1.layer.0.SelfAttention.q" in k},
     "missing"),
])
def test_broken_layouts(tmp_path, change, match):
    broken = {k: v.clone() for k, v in change(comfy_state_dict()).items()}  # no shared storage
    path = save_safetensors(tmp_path / "t5.safetensors", broken)
    with pytest.raises(CheckpointError, match=match):
        load_t5_file(path)


def _sharded(tmp_path):
    folder = tmp_path / "text_encoder_3"
    tiny_model().save_pretrained(folder, max_shard_size="300KB", safe_serialization=True)
    return folder, folder / "model.safetensors.index.json"


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_shard_index_cannot_leave_the_folder(tmp_path, shard):
    folder, index = _sharded(tmp_path)
    (tmp_path / "outside.safetensors").write_bytes(b"")
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="inside"):
        load_t5_file(folder)


def test_shard_symlink_out_of_the_folder_is_refused(tmp_path):
    folder, index = _sharded(tmp_path)
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    (folder / first).rename(tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", folder / first)
    with pytest.raises(CheckpointError, match="inside"):
        load_t5_file(folder)


def test_shard_index_promising_a_missing_key(tmp_path):
    folder, index = _sharded(tmp_path)
    data = json.loads(index.read_text())
    data["weight_map"]["encoder.block.9.layer.0.layer_norm.weight"] = next(iter(data["weight_map"].values()))
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="in no shard"):
        load_t5_file(folder)


def test_config_disagreeing_with_weights(tmp_path):
    folder, _ = _sharded(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["d_ff"] = 1024
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="d_ff"):
        load_t5_file(folder)


def test_pickle_with_code_is_never_run(tmp_path):
    folder = tmp_path / "text_encoder_2"
    folder.mkdir()

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"shared.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError):
        load_t5_file(folder)
    assert not (tmp_path / "pwned").exists()


def test_gguf_without_the_gguf_package_says_how_to_install(tmp_path, good_gguf, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(CheckpointError, match=r"textenc\[gguf\]"):
        load_t5_file(good_gguf)
