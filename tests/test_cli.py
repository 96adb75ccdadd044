"""The ``textenc`` command line, in process and as ``python -m textenc``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from textenc.vision import clip_vision
from textenc.cli import main, read_prompts
from textenc.nn.config import load_vision_config
from textenc.loading.convert import to_layout
from textenc.sd import load_clip
from textenc.prompts.tokenizer import DEFAULT_VOCAB

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 56, "patch_size": 14,
               "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32}
PROMPTS = ["a photo of a cat", "a (red:1.2) dog, [blue] sky"]


def _save(state_dict, path: Path) -> Path:
    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=49408, max_position_embeddings=77,
                                         projection_dim=128, hidden_act="quick_gelu")
    hf = transformers.CLIPTextModelWithProjection._from_config(config)
    return _save(to_layout(hf.state_dict(), "sd1"), tmp_path_factory.mktemp("m") / "tiny_sd1.safetensors")


def _python_m(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "textenc", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=120)


def _library(model: Path, prompt: str, options: dict):
    clip = load_clip(model)
    return clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True, options=options)


# --- encode -----------------------------------------------------------------------

def test_encode_matches_the_library(model, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    status = main(["encode", *PROMPTS, "--model", str(model), "--clip-skip", "2",
                   "--weight-mode", "a1111", "--out", str(out)])
    assert status == 0
    assert "wrote 2 prompt(s)" in capsys.readouterr().out
    tensors = load_file(out)
    assert set(tensors) == {"cond_0", "pooled_0", "cond_1", "pooled_1"}
    for index, prompt in enumerate(PROMPTS):
        cond, pooled = _library(model, prompt, {"layer": -2, "weight_mode": "a1111", "normalization": "none"})
        torch.testing.assert_close(tensors[f"cond_{index}"], cond, atol=0, rtol=0)
        torch.testing.assert_close(tensors[f"pooled_{index}"], pooled, atol=0, rtol=0)
    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["prompts"]) == PROMPTS
    options = json.loads(metadata["options"])
    assert (options["layer"], options["weight_mode"], options["clip_type"]) == (-2, "a1111", "sd1")


def test_prompts_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n(second:1.1)\n", encoding="utf-8")
    assert read_prompts(str(text)) == ["first prompt", "(second:1.1)"]
    lines = tmp_path / "p.jsonl"
    lines.write_text('"a"\n{"prompt": "b"}\n{"text": "c"}\n', encoding="utf-8")
    assert read_prompts(str(lines)) == ["a", "b", "c"]


@pytest.mark.slow
def test_encode_subprocess_with_prompts_file(model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    out = tmp_path / "sub.safetensors"
    result = _python_m("encode", "--prompts-file", str(prompts), "--model", str(model), "--out", str(out),
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    tensors = load_file(out)
    cond, pooled = _library(model, PROMPTS[1], {})
    torch.testing.assert_close(tensors["cond_1"], cond, atol=0, rtol=0)
    torch.testing.assert_close(tensors["pooled_1"], pooled, atol=0, rtol=0)


# --- inspect ----------------------------------------------------------------------

def test_inspect_json_tokens_match_hf(tmp_path, capsys):
    hf = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)
    embeddings = tmp_path / "emb"
    embeddings.mkdir()
    save_file({"emb_params": torch.randn(2, 768)}, embeddings / "style.safetensors")
    prompt = "a photo of a (red:1.5) cat embedding:style embedding:nothere"
    assert main(["inspect", prompt, "--embeddings", str(embeddings), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    window = report["windows"][0]
    ids = [t["token"] for t in window if t["word_id"] != 0 and t["token"] is not None]
    expected = [hf(text)["input_ids"][1:-1] for text in ("a photo of a ", "red", " cat")]
    assert ids == [i for part in expected for i in part]
    assert [t["text"] for t in window[:3]] == ["<|startoftext|>", "a</w>", "photo</w>"]
    assert {t["weight"] for t in window if t["token"] == hf("red")["input_ids"][1]} == {1.5}
    assert sum(t["token"] is None for t in window) == 2  # the two vectors of style
    status = {e["name"]: e["status"] for e in report["embeddings"]}
    assert status == {"style": "found", "nothere": "missing"}


@pytest.mark.slow
def test_inspect_table_subprocess_without_model_code(tmp_path):
    code = ("import sys; from textenc.cli import main; "
            "status = main(['inspect', 'a (red:1.2) cat BREAK dog', '--syntax', 'a1111']); "
            "assert 'textenc.nn.clip_model' not in sys.modules and 'textenc.sd' not in sys.modules; "
            "sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "window 1:" in result.stdout and "red</w>" in result.stdout and "dog</w>" in result.stdout
    assert "1.2" in result.stdout
    result = _python_m("inspect", "a cat", cwd=tmp_path)
    assert result.returncode == 0 and "cat</w>" in result.stdout


# --- vision -----------------------------------------------------------------------

def test_vision_matches_the_library(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setitem(clip_vision.VISION_KINDS, (64, 17), "tiny")
    monkeypatch.setattr(clip_vision, "load_vision_config",
                        lambda spec: load_vision_config(TINY_VISION if spec == "tiny" else spec))
    torch.manual_seed(1)
    hf = transformers.CLIPVisionModelWithProjection._from_config(transformers.CLIPVisionConfig(**TINY_VISION))
    weights = _save(hf.state_dict(), tmp_path / "vision.safetensors")
    pixels = (torch.rand(40, 60, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(tmp_path / "a.png")
    out = tmp_path / "v.safetensors"
    assert main(["vision", str(tmp_path / "a.png"), "--model", str(weights), "--out", str(out)]) == 0
    expected = clip_vision.load(weights).encode_image(pixels[None].float() / 255.0).image_embeds
    torch.testing.assert_close(load_file(out)["image_embeds_0"], expected)
    assert "wrote 1 image embedding(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_vision_subprocess_rejects_a_text_encoder(model, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    result = _python_m("vision", str(tmp_path / "a.png"), "--model", str(model), "--out",
                       str(tmp_path / "v.safetensors"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "not a CLIP vision model" in result.stderr
    assert "Traceback" not in result.stderr


# --- encode-dataset ---------------------------------------------------------------

@pytest.mark.slow
def test_encode_dataset_is_wired(tmp_path):
    result = _python_m("encode-dataset", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "encode-dataset" in result.stdout


# --- errors -----------------------------------------------------------------------

def _single_error(capsys, argv) -> str:
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.startswith("textenc: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_bad_inputs_give_one_line_errors(model, tmp_path, capsys):
    out = str(tmp_path / "o.safetensors")
    text = tmp_path / "model.txt"
    text.write_text("not a model")
    other = _save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, tmp_path / "unet.safetensors")
    assert "does not exist" in _single_error(capsys, ["encode", "a", "--model", str(tmp_path / "no.safetensors"),
                                                      "--out", out])
    assert "extension" in _single_error(capsys, ["encode", "a", "--model", str(text), "--out", out])
    assert "no CLIP text encoder" in _single_error(capsys, ["encode", "a", "--model", str(other), "--out", out])
    assert main(["encode", "--model", str(model), "--out", out]) == 2  # a usage error
    assert "textenc encode: error: no prompts" in capsys.readouterr().err
    assert "folder" in _single_error(capsys, ["encode", "a", "--model", str(model),
                                              "--out", str(tmp_path / "no" / "o.safetensors")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert "bad.jsonl:1" in _single_error(capsys, ["encode", "--prompts-file", str(bad), "--model", str(model),
                                                   "--out", out])
    _single_error(capsys, ["encode", "--prompts-file", str(tmp_path / "none.txt"), "--model", str(model),
                           "--out", out])
    _single_error(capsys, ["vision", str(text), "--model", str(other), "--out", out])
    _single_error(capsys, ["inspect", "a", "--embeddings", str(tmp_path / "nope")])
    assert "weight" in _single_error(capsys, ["inspect", "(a:nan)"])



def test_a_prompt_after_model_stays_a_prompt(model, tmp_path, capsys):
    out = tmp_path / "after.safetensors"
    assert main(["encode", "--model", str(model), PROMPTS[0], "--out", str(out)]) == 0
    cond, pooled = _library(model, PROMPTS[0], None)
    torch.testing.assert_close(load_file(out)["cond_0"], cond, atol=0, rtol=0)


@pytest.mark.parametrize("normalization", ["mean", "length", "length+mean"])
def test_encode_normalization_matches_the_library(model, tmp_path, capsys, normalization):
    """--normalization needs word ids; the command tokenized without them and always failed."""
    out = tmp_path / "out.safetensors"
    prompt = "a (supercalifragilistic:1.5) fox in the (snow:0.8)"  # a word of several tokens
    assert main(["encode", prompt, "--model", str(model), "--normalization", normalization,
                 "--out", str(out)]) == 0
    clip = load_clip(model)
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt, return_word_ids=True), return_pooled=True,
                                           options={"normalization": normalization})
    torch.testing.assert_close(load_file(out)["cond_0"], cond, atol=0, rtol=0)
    plain = clip.encode_from_tokens(clip.tokenize(prompt))
    assert not torch.equal(cond, plain)  # the option did something


def test_deeply_nested_jsonl_line_is_a_one_line_error(model, tmp_path, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "\n")
    assert "deep.jsonl:1: JSON nested too deeply" in _single_error(
        capsys, ["encode", "--prompts-file", str(deep), "--model", str(model), "--out", str(tmp_path / "o.safetensors")])
