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
