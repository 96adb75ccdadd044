"""Mistakes that need no model weights are refused before any are loaded (issue 28, point 5).

``--clip-skip 0``, a weight beyond ``--max-weight`` (or not finite), a missing model
file, an ``encode-dataset --out`` that cannot be written and a ``vision`` "image" that
is a text file each took 4-16 s (the model load) to be reported. Here every loader is
replaced by one that fails the test if called, and the model file is junk that no
loader could read: each command must still end with its own one-line error. Two cases
run in a fresh interpreter to show that torch is not even imported.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from textenc.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _never(*args, **kwargs):
    raise AssertionError("a model loader was called before the input checks")


@pytest.fixture
def no_loading(monkeypatch):
    import textenc.dataset.model
    import textenc.load
    import textenc.sd
    from textenc.vision import clip_vision

    for module, name in [(textenc.load, "load_text_model"), (textenc.sd, "load_clip"), (clip_vision, "load"),
                         (textenc.dataset.model, "load_clip"), (textenc.dataset.model, "load_from_diffusers")]:
        monkeypatch.setattr(module, name, _never)


@pytest.fixture
def junk_model(tmp_path) -> Path:
    """A 'model' no loader can read: reaching a loader would be a different error."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a safetensors file")
    return path


def run(capsys, *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    return status, capsys.readouterr().err


def encode(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["encode", "--model", str(model), "--out", str(tmp_path / "out.safetensors"), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--clip-skip", "0", "a cat"], "textenc: error: --clip-skip 0 does not exist: 1 is the last layer"),
    (["--max-weight", "100", "a (cat:1e39)"], "weight '1e39' of 'cat' at character 7 is not a finite"),
    (["--max-weight", "100", "a (cat:500)"], "weight 500.0 of 'cat' at character 3 exceeds --max-weight 100.0"),
    (["--max-weight", "100", "--syntax", "a1111", "a (cat:500)"], "has weight 500 exceeds --max-weight 100.0"),
    (["--max-weight", "100", "--syntax", "compel", "a (cat)500"], "has weight 500 exceeds --max-weight 100.0"),
    (["--max-weight", "100", "--prompts-file", "PROMPTS"], "weight 500.0 of 'cat' at character 1 exceeds"),
])
def test_encode_checks_before_loading(no_loading, junk_model, tmp_path, capsys, extra, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n(cat:500)\n", encoding="utf-8")
    extra = [str(prompts) if word == "PROMPTS" else word for word in extra]
    status, err = run(capsys, *encode(junk_model, tmp_path, *extra))
    assert status == 1 and message in err and len(err.splitlines()) == 1, err


def test_encode_missing_model(no_loading, tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    status, err = run(capsys, *encode(missing, tmp_path, "a cat"))
    assert (status, err) == (1, f"textenc: error: {missing}: does not exist; check the path\n")


def test_encode_checks_every_model_path(no_loading, junk_model, tmp_path, capsys):
    missing = tmp_path / "clip_g.safetensors"
    status, err = run(capsys, *encode(junk_model, tmp_path, "--model", str(missing), "a cat"))
    assert (status, err) == (1, f"textenc: error: {missing}: does not exist; check the path\n")


def test_inspect_checks_every_model_path(no_loading, junk_model, tmp_path, capsys):
    missing = tmp_path / "t5xxl_fp16.safetensors"
    status, err = run(capsys, "inspect", "a cat", "--model", str(junk_model), "--model", str(missing))
    assert (status, err) == (1, f"textenc: error: {missing}: does not exist; check the path\n")


def test_vision_refuses_a_text_file_as_image(no_loading, junk_model, tmp_path, capsys):
    pytest.importorskip("PIL")
    text = tmp_path / "cat.png"
    text.write_text("a cat, not a picture\n", encoding="utf-8")
    status, err = run(capsys, "vision", str(text), "--model", str(junk_model),
                      "--out", str(tmp_path / "out.safetensors"))
    assert status == 1
    assert err == f"textenc: error: {text}: not an image Pillow can read (UnidentifiedImageError); " \
                  "give a PNG, JPEG, WebP, ... file\n"


def test_vision_missing_model(no_loading, tmp_path, capsys):
    missing = tmp_path / "vision.safetensors"
    status, err = run(capsys, "vision", str(tmp_path / "cat.png"), "--model", str(missing),
                      "--out", str(tmp_path / "out.safetensors"))
    assert (status, err) == (1, f"textenc: error: {missing}: does not exist; check the path\n")


@pytest.fixture
def captions(tmp_path) -> Path:
    path = tmp_path / "captions.txt"
    path.write_text("a cat\na dog\n", encoding="utf-8")
    return path


def dataset(captions: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["encode-dataset", str(captions), "--model", str(model), "--out", str(out), *extra]


def test_dataset_out_under_a_file(no_loading, junk_model, captions, tmp_path, capsys):
    status, err = run(capsys, *dataset(captions, junk_model, junk_model / "out"))
    assert status == 1
    assert err == (f"textenc: error: --out {junk_model / 'out'}: not a folder (its parent {junk_model} is a "
                   "file); give a folder path\n")


def test_dataset_out_not_writable(no_loading, junk_model, captions, tmp_path, capsys, monkeypatch):
    """A read-only mount (as root, permissions alone do not stop a write)."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    out = tmp_path / "new" / "out"
    status, err = run(capsys, *dataset(captions, junk_model, out))
    assert status == 1
    assert err == (f"textenc: error: --out {out}: cannot write in folder {tmp_path} "
                   f"({os.strerror(errno.EROFS)}); choose a writable location\n")
    assert not out.parent.exists()


def test_dataset_clip_skip_zero_and_missing_model(no_loading, junk_model, captions, tmp_path, capsys):
    status, err = run(capsys, *dataset(captions, junk_model, tmp_path / "out", "--clip-skip", "0"))
    assert status == 1 and err.startswith("textenc: error: --clip-skip 0 does not exist")
    missing = tmp_path / "missing.safetensors"
    status, err = run(capsys, *dataset(captions, missing, tmp_path / "out"))
    assert (status, err) == (1, f"textenc: error: --model {missing}: no such file or folder\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--clip-skip", "0"], ["--model", "MISSING"]])
def test_no_torch_import_for_these(extra, junk_model, tmp_path):
    """In a fresh interpreter: the checks import no torch, so they answer at once."""
    extra = [str(tmp_path / "missing.safetensors") if word == "MISSING" else word for word in extra]
    argv = encode(junk_model, tmp_path, *extra, "a cat")
    code = ("import sys; from textenc.cli import main; status = main(sys.argv[1:]); "
            "print(status, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                            timeout=120, cwd=tmp_path)
    assert result.stdout.split() == ["1", "False"], result.stderr
    assert result.stderr.startswith("textenc: error: ")


# ---- --clip-skip beyond the model's depth, from the safetensors header --------------------

def _loaded_message(model: Path, clip_skip: int) -> str:
    """What the loaded model says of ``clip_skip`` (the check after loading), as the CLI words it."""
    from textenc.commands.encode import resolve_layer
    from textenc.errors import LayerError
    from textenc.load import load_text_model

    with pytest.raises(LayerError) as caught:
        resolve_layer(load_text_model(str(model)), clip_skip)
    return f"textenc: error: {caught.value}\n".replace("clip_skip", "--clip-skip", 1)


@pytest.mark.parametrize("layout", ["file", "diffusers"])
def test_clip_skip_beyond_the_depth_before_loading(layout, tiny_model, captions, tmp_path, capsys, monkeypatch):
    """The tiny model has 2 layers: --clip-skip 3 (and ComfyUI's -3) is refused from the
    header (a diffusers folder: its config.json) by encode and encode-dataset alike, with
    the message the loaded model gives."""
    model = tiny_model if layout == "file" else tiny_model.parent / "diffusers"
    expected = _loaded_message(model, 3)
    assert "is out of range for a 2-layer text encoder" in expected
    for module, name in _LOADERS:
        monkeypatch.setattr(module(), name, _never)
    status, err = run(capsys, *encode(model, tmp_path, "--clip-skip", "3", "a cat"))
    assert (status, err) == (1, expected)
    status, err = run(capsys, *dataset(captions, model, tmp_path / "out", "--clip-skip", "3"))
    assert (status, err) == (1, expected)
    status, err = run(capsys, *dataset(captions, model, tmp_path / "out", "--clip-skip", "-3"))
    assert (status, err) == (1, expected.replace("--clip-skip 3", "--clip-skip -3"))
    assert not (tmp_path / "out").exists()


def _modules():
    import textenc.dataset.model
    import textenc.load
    import textenc.sd

    return textenc.load, textenc.sd, textenc.dataset.model


_LOADERS = [(lambda: _modules()[0], "load_text_model"), (lambda: _modules()[1], "load_clip"),
            (lambda: _modules()[2], "load_clip"), (lambda: _modules()[2], "load_from_diffusers")]


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory):
    from family_fixtures import TinyFamily

    return TinyFamily(tmp_path_factory.mktemp("families"))


@pytest.mark.parametrize("parts, clip_type", [
    (["l"], None), (["l", "g_named"], None), (["l", "t5"], None), (["sd3"], None), (["umt5"], None),
    (["l", "g_named", "t5"], None), (["g_named", "t5"], "sd3")])
def test_the_header_depth_is_the_loaded_models(tiny_family, parts, clip_type):
    """The depth read from the headers is the loaded model's ``numbered_layers`` (every
    text encoder counts, T5 and UMT5 too), for standalone files and an SD3 single file."""
    from textenc.commands.early_checks import numbered_depth
    from textenc.load import load_text_model

    paths = [str(tiny_family.paths[part]) for part in parts]
    assert numbered_depth(paths) == load_text_model(paths, clip_type=clip_type).numbered_layers


def test_a_23_layer_vit_h_counts_as_24(tmp_path):
    """diffusers' SD2 text encoder holds 23 of ViT-H's 24 layers and is numbered as ViT-H
    (ComfyUI's numbering): 24 is its deepest clip skip, 25 is refused from config.json alone."""
    import json

    from textenc.commands.early_checks import check_clip_skip_depth
    from textenc.errors import LayerError

    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}))
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 1024, "num_hidden_layers": 23}))
    check_clip_skip_depth(24, [tmp_path])
    with pytest.raises(LayerError, match=r"^clip_skip 25 is out of range for a 24-layer text encoder"):
        check_clip_skip_depth(25, [tmp_path])


def test_a_model_whose_depth_cannot_be_read_is_checked_once_loaded(junk_model, tmp_path):
    from textenc.commands.early_checks import check_clip_skip_depth, numbered_depth

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 a pickle is never read for this")
    for paths in ([junk_model], [ckpt], [tmp_path / "missing.safetensors"], [tmp_path]):
        assert numbered_depth(paths) is None
        check_clip_skip_depth(99, paths)
