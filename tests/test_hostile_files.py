"""Issue #5 (3, 4, 6): hostile embedding and checkpoint files, end to end.

Complements tests/test_embeddings.py and tests/test_checkpoint.py (which test
the readers one by one, including the source audit that no code path calls
``pickle.load`` or ``torch.load`` without ``weights_only=True``:
``test_checkpoint.py::test_textenc_never_unpickles_unsafely``). Here:

* an audit hook in a *subprocess* (hooks cannot be removed) watches ``open``,
  ``os.listdir`` and ``os.scandir`` while hostile names are looked up;
* malicious pickles under every pickle suffix, through the public entry points;
* peak RSS added by each hostile file, measured in a fresh subprocess;
* checkpoints through ``textenc.sd.load_clip`` and ``SDClipModel.load_sd``.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from textenc.loading.checkpoint import load_state_dict
from textenc.loading.convert import to_layout
from textenc.loading.embeddings import EmbeddingLoader
from textenc.errors import CheckpointError, CheckpointWarning, EncodeError, TextencError
from textenc.sd import load_clip
from textenc.text_encoders.sd1_clip import SDClipModel

WIDTH = 768
MB = 1 << 20


def _run_python(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter; return its stdout (fails on a non-zero exit)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# --- traversal, audited in a subprocess ----------------------------------------------

_AUDIT_SCRIPT = """
import json, os, sys, warnings
from textenc.prompts.tokenizer import SDTokenizer
root, names = sys.argv[1], json.loads(sys.argv[2])
tok = SDTokenizer(embedding_directory=root)
seen = []
def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        seen.append((event, os.fsdecode(args[0])))
sys.addaudithook(hook)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name in names:
        tok.tokenize_with_weights(f"a embedding:{name} cat")
print(json.dumps({"seen": seen, "warnings": [str(w.message) for w in caught]}))
"""


@pytest.mark.slow
def test_hostile_names_open_and_list_nothing_outside_the_root(tmp_path):
    root = tmp_path / "embeddings"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    torch.save(torch.ones(1, WIDTH), outside / "secret.pt")
    torch.save(torch.ones(1, WIDTH), tmp_path / "secret.pt")
    os.symlink(outside / "secret.pt", root / "filelink.pt")  # file link leaving the root
    os.symlink(outside, root / "dirlink")  # folder link leaving the root
    os.symlink(outside / "secret.pt", root / "sub" / "deep.safetensors")  # link named with another suffix
    names = ["..", ".", "../secret", "../secret.pt", "sub/../../secret", "..\\secret", str(outside / "secret"),
             str(outside / "secret.pt"), "filelink", "filelink.pt", "dirlink/secret", "dirlink/secret.pt",
             "deep", "sub/deep", "/etc/passwd", "~/secret", "sub/./../../secret"]
    out = json.loads(_run_python(_AUDIT_SCRIPT, str(root), json.dumps(names)))
    real_root = os.path.realpath(root)
    escaped = [(event, path) for event, path in out["seen"]
               if os.path.commonpath((real_root, os.path.realpath(path))) != real_root]
    assert escaped == []
    assert len(out["warnings"]) == len(names)  # each name is reported, none is silently used
    assert any(event == "os.scandir" for event, _ in out["seen"])  # the hook did watch the walk


# --- pickles never run, under any suffix and entry point -------------------------------

class _WritesMarker:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt", ".pth"])
def test_malicious_pickle_never_runs_through_public_loaders(tmp_path, suffix):
    marker = tmp_path / "marker"
    root = tmp_path / "embeddings"
    root.mkdir()
    evil = root / f"evil{suffix}"
    torch.save({"string_to_param": {"*": _WritesMarker(str(marker))}}, evil)
    raw = tmp_path / f"raw{suffix}"
    raw.write_bytes(pickle.dumps({"cond_stage_model.transformer.x": _WritesMarker(str(marker))}))
    for name in ("evil", f"evil{suffix}"):
        result = EmbeddingLoader(str(root), WIDTH).lookup(name)
        assert result.status in ("rejected", "missing")  # .ckpt/.pth are never embedding files
    for path in (evil, raw):
        with pytest.raises(CheckpointError):
            load_clip(str(path))
    assert not marker.exists()


# --- peak memory of hostile files, in a subprocess --------------------------------------

_RSS_SCRIPT = """
import json, os, resource, sys
import torch, textenc.loading.embeddings, textenc.loading.checkpoint, textenc.sd  # imports are not the files' cost
from textenc.errors import TextencError
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
baseline, report = peak(), []
for kind, path in json.loads(sys.argv[1]):
    outcome = "loaded"
    try:
        if kind == "embedding":
            folder, name = os.path.split(path)
            outcome = textenc.loading.embeddings.EmbeddingLoader(folder, 768).lookup(os.path.splitext(name)[0]).status
        else:
            textenc.sd.load_clip(path)
    except TextencError:
        outcome = "refused"
    report.append((os.path.basename(path), outcome, peak() - baseline))
print(json.dumps(report))
"""


def _zip(path: Path, members: dict[str, bytes], compression: int) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _declared_size_zip(path: Path, declared: int) -> Path:
    """A stored zip whose one member's headers claim ``declared`` bytes (the data is 4 bytes)."""
    _zip(path, {"archive/data.pkl": pickle.dumps({}), "archive/data/0": b"abcd"}, zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    for signature, size_offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            name_len = struct.unpack_from("<H", data, start + (26 if signature == b"PK\x03\x04" else 28))[0]
            name_at = start + (30 if signature == b"PK\x03\x04" else 46)
            if data[name_at:name_at + name_len] == b"archive/data/0":
                struct.pack_into("<I", data, start + size_offset, declared)
            start += 4
    path.write_bytes(bytes(data))
    return path


def _huge_safetensors(path: Path) -> Path:
    """A header claiming a 16 GiB tensor in a 100-byte file."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 32], "data_offsets": [0, 1 << 34]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    return path


def _hostile_files(tmp_path: Path) -> list[tuple[str, Path]]:
    files = tmp_path / "files"
    files.mkdir()
    bomb = b"\0" * (200 * MB)  # deflates to ~200 KB
    return [
        ("embedding", _zip(files / "bomb.pt", {"archive/data.pkl": pickle.dumps({}), "archive/data/0": bomb},
                           zipfile.ZIP_DEFLATED)),
        ("embedding", _declared_size_zip(files / "claims.pt", 3 << 30)),
        ("embedding", _zip(files / "bombsafe.safetensors", {"x": bomb}, zipfile.ZIP_DEFLATED)),
        ("checkpoint", _zip(files / "bomb.ckpt", {"archive/data.pkl": pickle.dumps({}), "archive/data/0": bomb},
                            zipfile.ZIP_DEFLATED)),
        ("checkpoint", _declared_size_zip(files / "claims.ckpt", 3 << 30)),
        ("checkpoint", _huge_safetensors(files / "huge.safetensors")),
    ]


@pytest.mark.slow
def test_hostile_files_are_refused_within_64_mb_of_peak_rss(tmp_path):
    files = _hostile_files(tmp_path)
    assert all(path.stat().st_size < 1 * MB for _, path in files)
    # One interpreter for all files (importing torch is the slow part): ru_maxrss is
    # a high-water mark, so "peak - baseline" after each file bounds every file's cost.
    report = json.loads(_run_python(_RSS_SCRIPT, json.dumps([(kind, str(path)) for kind, path in files])))
    assert [outcome for _, outcome, _ in report] == ["rejected"] * 3 + ["refused"] * 3, report
    assert all(added <= 64 * MB for _, _, added in report), report


# --- embeddings: cache keyed by real path ------------------------------------------------

def test_cache_is_keyed_by_real_path_and_reloads_on_change(tmp_path):
    root = tmp_path / "embeddings"
    root.mkdir()
    torch.save(torch.ones(1, WIDTH), root / "real.pt")
    os.symlink(root / "real.pt", root / "alias.pt")  # a link inside the root is allowed
    loader = EmbeddingLoader(str(root), WIDTH)
    first = loader.lookup("real")
    assert loader.lookup("alias").vectors is first.vectors
    assert first.path == os.path.realpath(root / "real.pt")
    torch.save(torch.full((1, WIDTH), 2.0), root / "real.pt")  # same size; mtime changes
    stat = os.stat(root / "real.pt")
    os.utime(root / "real.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert float(loader.lookup("alias").vectors[0, 0]) == 2.0


# --- checkpoints through load_clip and load_sd --------------------------------------------

_TINY = {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 1, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
         "layer_norm_eps": 1e-5, "projection_dim": 64, "bos_token_id": 49406, "eos_token_id": 49407,
         "pad_token_id": 49407}


@pytest.fixture()
def sd1_checkpoint():
    """A random SD1-layout text encoder (width 64, 2 layers)."""
    model = SDClipModel(textmodel_json_config=_TINY)
    generator = torch.Generator().manual_seed(0)
    hf = {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in model.transformer.state_dict().items()}
    return to_layout(hf, "sd1")


def _key(sd: dict, fragment: str) -> str:
    return next(k for k in sd if fragment in k)


def test_load_clip_refuses_missing_unexpected_and_misshaped_keys(tmp_path, sd1_checkpoint):
    save_file(sd1_checkpoint, tmp_path / "ok.safetensors")
    load_clip(str(tmp_path / "ok.safetensors"))
    fc2 = _key(sd1_checkpoint, "layers.1.mlp.fc2.bias")
    cases = {
        "missing": ({k: v for k, v in sd1_checkpoint.items() if k != fc2}, ["missing", "layers.1.mlp.fc2.bias"]),
        "unexpected": ({**sd1_checkpoint, fc2.replace("fc2.bias", "extra"): torch.zeros(1)},
                       ["unexpected", "layers.1.mlp.extra"]),
        "misshaped": ({**sd1_checkpoint, fc2: torch.zeros(3)}, ["layers.1.mlp.fc2.bias", "(64,)", "(3,)"]),
    }
    for name, (sd, fragments) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(sd, path)
        with pytest.raises(CheckpointError) as caught:
            load_clip(str(path), strict=True)
        assert all(f in str(caught.value) for f in fragments), (name, str(caught.value))
    # A stray key is a warning by default, as in ComfyUI (strict=True above keeps refusing).
    with pytest.warns(CheckpointWarning, match=r"unexpected key.*layers\.1\.mlp\.extra") as caught:
        load_clip(str(tmp_path / "unexpected.safetensors"))
    assert caught[0].filename == __file__


def test_load_sd_lists_every_problem_in_one_error(sd1_checkpoint):
    model = SDClipModel(textmodel_json_config=_TINY)
    hf = {k.removeprefix("cond_stage_model.transformer."): v for k, v in sd1_checkpoint.items()}
    hf.pop("text_model.final_layer_norm.bias")
    hf["text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(2, 2)
    hf["text_model.bogus"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as caught:
        model.load_sd(hf)
    message = str(caught.value)
    for fragment in ("missing", "final_layer_norm.bias", "wrong shape", "fc1.weight", "unexpected", "bogus"):
        assert fragment in message
    hf.pop("text_model.bogus")
    hf["text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(128, 64)
    with pytest.raises(CheckpointError, match="missing"):
        model.load_sd(hf, strict=False)  # a missing key is never left uninitialised
    assert not model.loaded


def test_model_is_built_on_meta_and_encode_before_load_raises():
    model = SDClipModel(textmodel_json_config=_TINY)
    assert {p.device.type for p in model.transformer.parameters()} == {"meta"}
    with pytest.raises(CheckpointError, match="load_sd"):
        model.encode([[49406] + [49407] * 76])


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_load_clip_refuses_malformed_files(tmp_path, sd1_checkpoint):
    save_file(sd1_checkpoint, tmp_path / "good.safetensors")
    good = (tmp_path / "good.safetensors").read_bytes()
    duplicate = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
                b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    files = {
        "empty.safetensors": b"",
        "empty.ckpt": b"",
        "truncated.safetensors": good[: len(good) // 2],
        "truncated.ckpt": b"PK\x03\x04" + b"\0" * 100,
        "duplicate.safetensors": struct.pack("<Q", len(duplicate)) + duplicate + b"\0" * 8,
        "overlap.safetensors": _safetensors_bytes({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)},
                                                  b"\0" * 12),
        "dtype.safetensors": _safetensors_bytes({"a": _entry("F128", [1], 0, 16)}, b"\0" * 16),
        "garbage.pt": b"\x80\x04not really a pickle",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as caught:
            load_clip(str(tmp_path / name))
        assert name in str(caught.value), str(caught.value)


def test_non_finite_checkpoint_is_refused_with_the_finite_option(tmp_path, sd1_checkpoint):
    key = _key(sd1_checkpoint, "layers.0.mlp.fc1.weight")
    bad = dict(sd1_checkpoint)
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("inf")
    save_file(bad, tmp_path / "inf.safetensors")
    with pytest.raises(CheckpointError, match="fc1.weight"):
        load_clip(str(tmp_path / "inf.safetensors"), require_finite=True)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_state_dict(tmp_path / "inf.safetensors", require_finite=True)
    with pytest.raises(TextencError):
        load_clip(None, state_dicts=[("in-memory", bad)], require_finite=True)


# --- issue 15 point 7, issue 19 point 7: weights, stray keys, layers, vocabulary, output ----

def test_non_finite_weights_are_refused_by_default_and_encodes_check_their_output(tmp_path, sd1_checkpoint):
    key = _key(sd1_checkpoint, "layers.1.self_attn.q_proj.weight")
    bad = {**sd1_checkpoint, key: sd1_checkpoint[key].clone()}
    bad[key][3, 5] = float("nan")
    save_file(bad, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"nan.safetensors: tensor 'text_model.encoder.layers.1.self_attn.q_proj"
                                              r".weight' holds NaN"):
        load_clip(str(tmp_path / "nan.safetensors"))
    clip = load_clip(str(tmp_path / "nan.safetensors"), require_finite=False)  # the documented opt-out
    with pytest.raises(EncodeError, match=r"likely cause: the model weights: tensor '.*q_proj.weight'"):
        clip.encode_from_tokens(clip.tokenize("a cat"))


def test_integer_weights_are_a_checkpoint_error_naming_the_tensor(tmp_path, sd1_checkpoint):
    key = _key(sd1_checkpoint, "final_layer_norm.weight")
    save_file({**sd1_checkpoint, key: torch.ones(64, dtype=torch.int64)}, tmp_path / "int.safetensors")
    with pytest.raises(CheckpointError, match=r"int.safetensors: tensor 'text_model.final_layer_norm.weight' has "
                                              r"dtype torch.int64"):
        load_clip(str(tmp_path / "int.safetensors"))


def test_an_unrelated_stray_key_warns_and_strict_refuses(tmp_path, sd1_checkpoint):
    hf = {k.removeprefix("cond_stage_model.transformer."): v for k, v in sd1_checkpoint.items()}
    save_file({**hf, "some_adapter.scale": torch.ones(1)}, tmp_path / "stray.safetensors")
    with pytest.warns(CheckpointWarning, match=r"1 unexpected key\(s\): \['some_adapter.scale'\]"):
        clip = load_clip(str(tmp_path / "stray.safetensors"))
    reference = load_clip(None, state_dicts=[("plain", hf)])
    tokens = clip.tokenize("a cat")
    assert torch.equal(clip.encode_from_tokens(tokens), reference.encode_from_tokens(tokens))
    with pytest.raises(CheckpointError, match="some_adapter.scale"):
        load_clip(str(tmp_path / "stray.safetensors"), strict=True)


def test_a_stray_layer_index_never_sets_the_depth(sd1_checkpoint):
    hf = {k.removeprefix("cond_stage_model.transformer."): v for k, v in sd1_checkpoint.items()}
    stray = {**hf, "text_model.encoder.layers.7.mlp.fc1.weight": torch.zeros(128, 64)}
    with pytest.warns(CheckpointWarning, match=r"layers\.7\.mlp\.fc1\.weight"):
        clip = load_clip(None, state_dicts=[("stray", stray)])
    assert clip.cond_stage_model.encoder.num_layers == 2


def _clip_l_like(layers=12, width=768):
    """CLIP-L (or, with width 1024, ViT-H) widths, so the model is a known one, with a small MLP."""
    half = torch.float16
    sd = {"text_model.embeddings.token_embedding.weight": torch.zeros(49408, width, dtype=half),
          "text_model.embeddings.position_embedding.weight": torch.zeros(77, width, dtype=half),
          "text_model.final_layer_norm.weight": torch.ones(width, dtype=half),
          "text_model.final_layer_norm.bias": torch.zeros(width, dtype=half)}
    for n in layers if not isinstance(layers, int) else range(layers):
        p = f"text_model.encoder.layers.{n}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{name}.weight"] = torch.zeros(width, width, dtype=half)
            sd[p + f"self_attn.{name}.bias"] = torch.zeros(width, dtype=half)
        for name in ("layer_norm1", "layer_norm2"):
            sd[p + f"{name}.weight"], sd[p + f"{name}.bias"] = torch.ones(width, dtype=half), torch.zeros(width, dtype=half)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = torch.zeros(8, width, dtype=half), torch.zeros(8, dtype=half)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = torch.zeros(width, 8, dtype=half), torch.zeros(width, dtype=half)
    return sd


@pytest.mark.slow
def test_known_model_with_missing_layers_is_refused_naming_them():
    assert load_clip(None, state_dicts=[("full", _clip_l_like())]).cond_stage_model.encoder.num_layers == 12
    with pytest.raises(CheckpointError, match=r"short: text encoder 'l' is missing layer\(s\) \[11\] \(CLIP-L has 12 "
                                              r"layers\).*allow_missing_layers=True"):
        load_clip(None, state_dicts=[("short", _clip_l_like(11))])
    clip = load_clip(None, state_dicts=[("short", _clip_l_like(11))], allow_missing_layers=True)
    assert clip.cond_stage_model.encoder.num_layers == 11
    with pytest.raises(CheckpointError, match=r"missing layer\(s\) \[5\]"):  # a gap is never allowed
        load_clip(None, state_dicts=[("gap", _clip_l_like([n for n in range(12) if n != 5]))],
                  allow_missing_layers=True)
    with pytest.warns(CheckpointWarning, match=r"layers\.12\."):  # past CLIP-L's depth: stray, not a 13th layer
        extra = load_clip(None, state_dicts=[("extra", {**_clip_l_like(), **{
            k.replace("layers.0.", "layers.12."): v for k, v in _clip_l_like(1).items() if "layers.0.mlp" in k}})])
    assert extra.cond_stage_model.encoder.num_layers == 12


def test_strict_false_reaches_the_state_dict_load(sd1_checkpoint):
    hf = {k.removeprefix("cond_stage_model.transformer."): v for k, v in sd1_checkpoint.items()}
    one_layer = {**_TINY, "num_hidden_layers": 1}  # the file's layer 1 is then unexpected at load_sd
    with pytest.raises(CheckpointError, match=r"unexpected .*layers\.1\."):
        load_clip(None, state_dicts=[("two", hf)], text_configs={"l": one_layer}, strict=True)
    clip = load_clip(None, state_dicts=[("two", hf)], text_configs={"l": one_layer}, strict=False)
    assert clip.cond_stage_model.encoder.num_layers == 1
    model = SDClipModel(textmodel_json_config=_TINY)
    result = model.load_sd({**hf, "text_model.bogus": torch.zeros(1)}, strict=False)
    assert list(result.unexpected_keys) == ["text_model.bogus"]
    clip.load_sd({**{k: v for k, v in hf.items() if ".layers.1." not in k}, "text_model.bogus": torch.zeros(1)},
                 strict=False)
    with pytest.raises(CheckpointError, match="bogus"):
        clip.load_sd({**hf, "text_model.bogus": torch.zeros(1)})


def test_token_ids_beyond_the_vocabulary_are_a_typed_error(sd1_checkpoint):
    small = {**_TINY, "vocab_size": 1000}
    model = SDClipModel(textmodel_json_config=small)
    generator = torch.Generator().manual_seed(0)
    model.load_sd({k: torch.randn(v.shape, generator=generator) * 0.02
                   for k, v in model.transformer.state_dict().items()})
    with pytest.raises(CheckpointError, match=r"token id 49406 is outside the text encoder's vocabulary of 1000 "
                                                r"tokens \(window 0, position 0\)"):
        model.encode_token_weights([[(49406, 1.0), (320, 1.0), (49407, 1.0)]])


def test_non_finite_output_names_the_embedding_or_the_weight(sd1_checkpoint):
    hf = {k.removeprefix("cond_stage_model.transformer."): v for k, v in sd1_checkpoint.items()}
    clip = load_clip(None, state_dicts=[("tiny", hf)])
    tokens = clip.tokenize("a cat")
    window = list(tokens["l"][0])
    window[1] = (torch.full((64,), 3e38), 1.0)  # built by hand: the tokenizer refuses such files
    with pytest.raises(EncodeError, match="likely cause: an embedding vector"):
        clip.encode_from_tokens({"l": [window]})
    window = list(tokens["l"][0])
    window[1] = (window[1][0], 1e300)  # hand-built: the parser refuses weights beyond float32
    with pytest.raises(EncodeError, match=r"a prompt weight \(largest \|weight\| 1e\+300\)"):
        clip.encode_from_tokens({"l": [window]})


@pytest.mark.slow
def test_a_23_layer_vit_h_loads_and_matches_comfyui_penultimate():
    """diffusers' SD2 text_encoder stores 23 of ViT-H's 24 layers; ComfyUI loads it into its
    24-layer model and encodes with the penultimate layer, so textenc accepts it by default."""
    generator = torch.Generator().manual_seed(0)
    full = {k: (torch.randn(v.shape, generator=generator) * 0.02).to(torch.float16) if "norm" not in k else v
            for k, v in _clip_l_like(24, width=1024).items()}
    short = {k: v for k, v in full.items() if ".layers.23." not in k}
    ours = load_clip(None, state_dicts=[("diffusers-sd2", short)])
    assert ours.cond_stage_model.encoder.num_layers == 23
    comfy = load_clip(None, state_dicts=[("full", full)])  # ComfyUI's 24-layer model, penultimate by default
    tokens = ours.tokenize("a red fox")
    assert torch.equal(ours.encode_from_tokens(tokens), comfy.encode_from_tokens(tokens))
    with pytest.raises(CheckpointError, match=r"missing layer\(s\) \[22, 23\] \(CLIP-H has 24 layers\)"):
        load_clip(None, state_dicts=[("short", {k: v for k, v in short.items() if ".layers.22." not in k})])
