"""``compute_dtype``: the dtype the model runs in, recorded in the manifest, refused
where it would not run natively (bf16 without CPU bf16 units, fp16 off CUDA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import textenc.dataset.compute as compute
from dataset_fixtures import encoder, random_captions
from textenc.dataset import open_shards
from textenc.errors import DatasetError
from textenc.sd import load_clip

ROWS = 120


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> tuple[Path, list[str]]:
    return random_captions(tmp_path_factory, ROWS, seed=3)


_encode = encoder(dtype="fp32", shard_rows=60, batch_size=16)


def _rows(folder: Path) -> dict:
    return {i: (c, p) for i, c, p in open_shards(folder)}


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, captions, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("fp32")
    _encode(captions[0], tiny_model, out)
    return out


def test_fp16_file_computed_in_fp32_equals_casting_in_every_forward(tmp_path, captions, tiny_model):
    """The engines store the weights in the compute dtype once; ComfyUI's manual cast
    (what load_clip does with an fp16 file) casts in every forward: same numbers."""
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in load_file(str(tiny_model)).items()}, str(half))
    _encode(captions[0], half, tmp_path / "out", limit=40)
    clip = load_clip(str(half))
    for caption_id, cond, pooled in open_shards(tmp_path / "out"):
        direct = clip.encode_from_tokens(clip.tokenize(captions[1][caption_id]), return_pooled=True)
        assert torch.equal(cond, direct[0][0]) and torch.equal(pooled, direct[1][0])


@pytest.mark.skipif(not compute.cpu_has_bf16_units(), reason="this CPU has no bf16 units")
def test_bf16_compute_is_recorded_and_close_to_fp32(tmp_path, fp32_run, captions, tiny_model):
    _encode(captions[0], tiny_model, tmp_path, compute_dtype="bf16")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["compute"]["dtype"] == "bf16"
    reference, got = _rows(fp32_run), _rows(tmp_path)
    drift = max((got[i][0] - reference[i][0]).abs().max().item() for i in reference)
    assert 0 < drift < 0.25  # bf16 really ran (8-bit mantissa), and stayed close
    direct = load_clip(str(tiny_model))
    tokens = direct.tokenize(captions[1][5])
    bf16 = direct.encode_from_tokens(tokens, options={"compute_dtype": torch.bfloat16})
    assert torch.equal(got[5][0], bf16[0])  # the library's own bf16 encode


def test_bf16_without_cpu_units_is_refused(monkeypatch, tmp_path, captions, tiny_model):
    monkeypatch.setattr(compute, "cpu_has_bf16_units", lambda: False)
    with pytest.raises(DatasetError, match="no bf16 units on this CPU"):
        _encode(captions[0], tiny_model, tmp_path, compute_dtype="bf16", device="cpu")
    assert not (tmp_path / "manifest.json").exists()
    _encode(captions[0], tiny_model, tmp_path, compute_dtype="auto", device="cpu", limit=10)
    assert json.loads((tmp_path / "manifest.json").read_text())["compute"]["dtype"] == "fp32"


def test_fp16_compute_is_cuda_only(tmp_path, captions, tiny_model):
    with pytest.raises(DatasetError, match="CUDA only"):
        _encode(captions[0], tiny_model, tmp_path, compute_dtype="fp16", device="cpu")
    with pytest.raises(DatasetError, match="not one of"):
        _encode(captions[0], tiny_model, tmp_path, compute_dtype="fp64", device="cpu")


def test_a_resume_with_another_compute_dtype_is_refused(tmp_path, fp32_run, captions, tiny_model):
    for path in fp32_run.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    monkey = pytest.MonkeyPatch()
    monkey.setattr(compute, "cpu_has_bf16_units", lambda: True)  # refusal comes before compute
    try:
        with pytest.raises(DatasetError, match=r'dtype "fp32" -> "bf16"'):
            _encode(captions[0], tiny_model, tmp_path, compute_dtype="bf16")
    finally:
        monkey.undo()
