"""encode-dataset options mean one thing everywhere (issue 16) and a re-run says what
changed: A1111 clip skip with the resolved layer recorded, ``syntax``, explicit defaults
equal to left-out ones, help text, exit statuses and one-line errors."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dataset_fixtures import encoder, random_captions
from test_sd1_clip import hf_models, hf_state, to_layout  # noqa: F401  (fixture)
from textenc.dataset import main, open_shards
from textenc.dataset.cli import configure_parser
from textenc.prompts.dialects import default_weight_mode
from textenc.errors import DatasetError, EmbeddingWarning, LayerError, PromptError
from textenc.sd import load_clip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> tuple[Path, list[str]]:
    return random_captions(tmp_path_factory, 40, seed=5,
                           extra=["a [cat] BREAK (dog:1.5) house", "[[old]] man BREAK sky"])


@pytest.fixture(scope="module")
def sd2_model(hf_models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sd2") / "sd2.safetensors"
    save_file(to_layout(hf_state(hf_models["h"]), "sd2"), str(path))
    return path


_encode = encoder(dtype="fp32", shard_rows=25, batch_size=16)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# ---- clip skip ---------------------------------------------------------------------------

def test_clip_skip_counts_as_a1111_and_records_the_layer(tmp_path, captions, tiny_model):
    _encode(captions[0], tiny_model, tmp_path, clip_skip=2)
    assert _manifest(tmp_path)["options"]["layer"] == {"l": -2}
    clip = load_clip(str(tiny_model))
    for row, cond, _ in open_shards(tmp_path):
        direct = clip.encode_from_tokens(clip.tokenize(captions[1][row]), options={"layer": -2})
        assert torch.equal(cond, direct[0])
    # ComfyUI's -2 is the same request: the re-run resumes (nothing to do), no refusal.
    report = _encode(captions[0], tiny_model, tmp_path, clip_skip=-2)
    assert report.shards_written == 0 and report.shards_skipped == report.shards


@pytest.mark.parametrize("kind_default", [("sd1", 1), ("sd2", 2)])
def test_clip_skip_of_the_kinds_own_layer_is_the_default_run(tmp_path, captions, tiny_model, sd2_model,
                                                             kind_default):
    kind, clip_skip = kind_default
    model = tiny_model if kind == "sd1" else sd2_model
    _encode(captions[0], model, tmp_path, limit=25)
    assert _manifest(tmp_path)["options"]["layer"] == ({"l": -1} if kind == "sd1" else {"h": -2})
    report = _encode(captions[0], model, tmp_path, limit=25, clip_skip=clip_skip)
    assert report.shards_skipped == 1


@pytest.mark.parametrize("clip_skip,match", [(3, r"clip_skip 3 is out of range for a 2-layer"),
                                             (-3, r"clip_skip -3 is out of range for a 2-layer"),
                                             (0, r"clip_skip 0 does not exist")])
def test_clip_skip_outside_the_model_is_a_layer_error(tmp_path, captions, tiny_model, clip_skip, match):
    with pytest.raises(LayerError, match=match):
        _encode(captions[0], tiny_model, tmp_path, clip_skip=clip_skip)
    assert not (tmp_path / "manifest.json").exists()


def test_cli_clip_skip_out_of_range_is_one_line_exit_1(tmp_path, captions, tiny_model, capsys):
    code = main([str(captions[0]), "--model", str(tiny_model), "--out", str(tmp_path / "o"),
                 "--clip-skip", "13", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert "--clip-skip 13" in err and "2-layer" in err and "up to 2" in err


# ---- syntax and weight mode ----------------------------------------------------------------

def test_syntax_reaches_the_tokenizer_and_the_manifest(tmp_path, captions, tiny_model):
    _encode(captions[0], tiny_model, tmp_path / "a1111", syntax="a1111")
    _encode(captions[0], tiny_model, tmp_path / "comfy")
    options = _manifest(tmp_path / "a1111")["options"]
    assert options["syntax"] == "a1111" and options["weight_mode"] == default_weight_mode("a1111")
    clip = load_clip(str(tiny_model))
    a1111 = {row: cond for row, cond, _ in open_shards(tmp_path / "a1111")}
    comfy = {row: cond for row, cond, _ in open_shards(tmp_path / "comfy")}
    for row in (40, 41):  # [x] and BREAK read differently by the two syntaxes
        tokens = clip.tokenize(captions[1][row], syntax="a1111")
        direct = clip.encode_from_tokens(tokens, options={"weight_mode": default_weight_mode("a1111")})
        assert torch.equal(a1111[row], direct[0])
        assert a1111[row].shape != comfy[row].shape or not torch.equal(a1111[row], comfy[row])
    with pytest.raises(PromptError, match="unknown prompt syntax 'bogus'"):
        _encode(captions[0], tiny_model, tmp_path / "bad", syntax="bogus")


def test_compel_syntax_blends_and_conjunctions_are_applied(tmp_path, tiny_model):
    """compel's .blend()/.and() and down-weights need its extra encodes: the dataset gives
    the same tensors as the library's compel path (itself checked against the real compel
    in tests/test_compel_oracle.py), not the plain encoding of the text."""
    texts = ['("a red fox", "a blue bird").blend(0.7, 0.3)', '("snowy forest", "a cabin").and()',
             "a (cat)0.5 on a mat", "a plain caption"]
    path = tmp_path / "compel.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    _encode(path, tiny_model, tmp_path / "out", syntax="compel")
    clip = load_clip(str(tiny_model))
    rows = {row: cond for row, cond, _ in open_shards(tmp_path / "out")}
    for row, text in enumerate(texts):
        direct = clip.encode_from_tokens(clip.tokenize(text, syntax="compel"), options={"weight_mode": "compel"})
        assert torch.equal(rows[row], direct[0]), text
    plain = clip.encode_from_tokens(clip.tokenize("a red fox a blue bird"))
    assert rows[0].shape != plain[0].shape or not torch.equal(rows[0], plain[0])


def test_options_given_with_their_default_are_the_same_options(tmp_path, captions, tiny_model, capsys):
    args = [str(captions[0]), "--model", str(tiny_model), "--out", str(tmp_path), "--shard-rows", "25",
            "--limit", "30", "--no-progress"]
    assert main(args) == 0
    explicit = ["--weight-mode", "comfy", "--syntax", "comfy", "--dtype", "fp16", "--threads", "1",
                "--batch-size", "64", "--compute-dtype", "fp32", "--column", "text",
                "--outputs", "cond,pooled", "--max-chars", "16384", "--max-windows", "64"]
    capsys.readouterr()
    assert main(args + explicit) == 0
    assert "already complete: all 2 shards were written by an earlier run" in capsys.readouterr().out


# ---- what a refused re-run says ----------------------------------------------------------

def test_a_refused_rerun_names_each_change(tmp_path, captions, tiny_model):
    _encode(captions[0], tiny_model, tmp_path, limit=30)
    with pytest.raises(DatasetError) as info:
        _encode(captions[0], tiny_model, tmp_path, limit=30, dtype="fp16", weight_mode="a1111",
                threads=2)
    message = str(info.value)
    assert 'dtype "fp32" -> "fp16"' in message and 'weight_mode "comfy" -> "a1111"' in message
    assert "threads 1 -> 2" in message and "--overwrite" in message and "\n" not in message
    assert "model" not in message.replace("--model", "") and "input" not in message
    with pytest.raises(DatasetError, match=r"a different input \(30 rows"):
        _encode(captions[0], tiny_model, tmp_path, limit=31)
    other = tmp_path.parent / "other.safetensors"
    from safetensors.torch import load_file
    state = load_file(str(tiny_model))
    first = sorted(state)[0]
    state[first] = state[first] + 1
    save_file(state, str(other))
    with pytest.raises(DatasetError, match=r"a different model \(model_fingerprint"):
        _encode(captions[0], other, tmp_path, limit=30)


# ---- help and exit statuses ------------------------------------------------------------------

def test_every_option_has_help_that_shows_its_default():
    parser = configure_parser(argparse.ArgumentParser())
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:  # an old spelling kept as a hidden alias (--kind)
            assert action.option_strings == ["--kind"]
            continue
        if action.dest in ("help", "input", "model", "out"):
            assert action.help
            continue
        assert action.help and "default" in action.help, action.option_strings
    text = parser.format_help()
    assert "{cond,pooled,pooled}" not in text and "-1/-2" in text


def test_usage_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["captions.txt", "--model", "m.safetensors"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err
    assert "--out" in err and err.endswith("; see 'python -m textenc.dataset --help'")


# Both entry points, ``textenc encode-dataset`` and ``python -m textenc.dataset``, are one
# parser and one error path: the same input gives the same lines, each under its own name.
BAD_ARGUMENTS = [
    ["in.txt", "--model", "m.safetensors"],
    ["in.txt", "--model", "m", "--out", "o", "--shard-rows", "0"],
    ["in.txt", "--model", "m", "--out", "o", "--outputs", "cond"],
    ["in.txt", "--model", "m", "--out", "o", "--syntax", "bogus"],
    ["in.txt", "--model", "m", "--out", "o", "--clip-skip", "two"],
    ["in.txt", "--model", "m", "--out", "o", "--bogus"],
    ["in.txt", "--model", "m", "--out", "o", "--shard-rws", "2"],
    ["in.txt", "--modle", "m", "--out", "o"],
]
USAGE_LINE = re.compile(r"(?P<prog>[^:]+): error: (?P<message>.+); see '(?P=prog) --help'\n")


def _both_entry_points(capsys, argv: list[str]) -> list[tuple[int, str, str]]:
    """``(exit status, stdout, stderr)`` of ``textenc encode-dataset ARGV`` and of
    ``python -m textenc.dataset ARGV`` (whose ``main`` exits as a script does)."""
    from textenc.cli import main as textenc_main

    results = []
    for run in (lambda: textenc_main(["encode-dataset", *argv]), lambda: main(argv)):
        try:
            status = run()
        except SystemExit as done:
            status = done.code
        captured = capsys.readouterr()
        results.append((status, captured.out, captured.err))
    return results


@pytest.mark.parametrize("argv", BAD_ARGUMENTS, ids=lambda argv: argv[-1])
def test_both_entry_points_give_the_same_usage_error(capsys, argv):
    (status, out, err), (other_status, other_out, other_err) = _both_entry_points(capsys, argv)
    assert status == other_status == 2 and out == other_out == ""
    line, other_line = USAGE_LINE.fullmatch(err), USAGE_LINE.fullmatch(other_err)
    assert line and other_line, (err, other_err)
    assert line["message"] == other_line["message"]
    # An unknown option is reported by the sub-command's own parser, with the closest option.
    assert line["prog"] == "textenc encode-dataset"
    if "--shard-rws" in argv or "--modle" in argv:
        assert "(did you mean --shard-rows?)" in err or "(did you mean --model?)" in err
    assert other_line["prog"] == "python -m textenc.dataset"


def test_both_entry_points_give_the_same_help_and_runtime_error(capsys, tmp_path):
    (status, text, _), (other_status, other_text, _) = _both_entry_points(capsys, ["--help"])
    assert status == other_status == 0
    same = lambda text, prog: " ".join(text.replace(prog, "PROG").split())  # noqa: E731  (wrapping differs)
    assert same(text, "textenc encode-dataset") == same(other_text, "python -m textenc.dataset")
    assert "--outputs {cond,pooled|pooled}" in text and "(default: cond,pooled)" in text
    missing = [str(tmp_path / "no-such.txt"), "--model", "m", "--out", str(tmp_path / "o")]
    (status, _, err), (other_status, _, other_err) = _both_entry_points(capsys, missing)
    assert status == other_status == 1
    assert err.startswith("textenc: error: ") and other_err.startswith("python -m textenc.dataset: error: ")
    assert err.split(": error: ", 1)[1] == other_err.split(": error: ", 1)[1]
    assert err.count("\n") == 1 and "no-such.txt" in err


def test_os_error_is_one_line_naming_the_path_exit_1(tmp_path, captions, tiny_model, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = main([str(captions[0]), "--model", str(tiny_model), "--out", str(blocker), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and str(blocker) in err


def test_unicode_and_library_errors_are_one_line_exit_1(monkeypatch, tmp_path, capsys):
    import textenc.dataset.cli as cli

    def undecodable(*args, **kwargs):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(cli, "encode_dataset", undecodable)
    code = main([str(tmp_path / "in.txt"), "--model", "m", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "in.txt: not UTF-8" in err
    monkeypatch.undo()
    code = main([str(tmp_path / "in.txt"), "--model", "m", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "in.txt" in err  # a DatasetError: no such input


def test_a_disk_fault_after_some_shards_says_how_to_resume(monkeypatch, tmp_path, captions, tiny_model, capsys):
    import errno

    import textenc.dataset.cli as cli

    out = tmp_path / "out"
    _encode(captions[0], tiny_model, out, limit=30)  # 2 shards of 25 rows

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "shard-00002.safetensors"))

    monkeypatch.setattr(cli, "encode_dataset", disk_full)
    assert main([str(captions[0]), "--model", str(tiny_model), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m textenc.dataset: error: ")
    assert f"{out / 'shard-00002.safetensors'}: the disk is full: free some space or write elsewhere; " \
           "2 of 2 shards are finished: run the same command again to resume" in err


# ---- one vocabulary with textenc encode: --clip-type, --normalization, --embeddings (issue 28) ------

STYLE_CAPTIONS = ["embedding:style a cat", "a (red:1.3) house by the (river:0.8)", "a cat",
                  "embedding:style a cat"]


@pytest.fixture()
def styled(tmp_path) -> tuple[Path, Path]:
    """``(captions file, embedding folder holding style.safetensors, 2 vectors of width 128)``."""
    folder = tmp_path / "emb"
    folder.mkdir()
    generator = torch.Generator().manual_seed(1)
    save_file({"emb_params": torch.randn(2, 128, generator=generator) * 0.1}, str(folder / "style.safetensors"))
    path = tmp_path / "styled.txt"
    path.write_text("\n".join(STYLE_CAPTIONS) + "\n", encoding="utf-8")
    return path, folder


def test_embeddings_and_normalization_encode_as_the_library_does(tmp_path, styled, tiny_model):
    path, folder = styled
    _encode(path, tiny_model, tmp_path / "out", embeddings=folder, normalization="mean", shard_rows=2)
    options = _manifest(tmp_path / "out")["options"]
    assert options["normalization"] == "mean" and options["embeddings"]["folder"] == str(folder)
    assert options["embeddings"]["sha256"].startswith("sha256:")
    clip, plain = load_clip(str(tiny_model), embedding_directory=str(folder)), load_clip(str(tiny_model))
    for row, cond, pooled in open_shards(tmp_path / "out"):
        tokens = clip.tokenize(STYLE_CAPTIONS[row], return_word_ids=True)
        direct = clip.encode_from_tokens(tokens, return_pooled=True, options={"normalization": "mean"})
        assert torch.equal(cond, direct[0][0]) and torch.equal(pooled, direct[1][0])
    first = next(iter(open_shards(tmp_path / "out")))[1]
    with pytest.warns(EmbeddingWarning, match="read as text"):
        as_text = plain.encode_from_tokens(plain.tokenize(STYLE_CAPTIONS[0]))[0]
    assert not torch.equal(first, as_text[0])  # the embedding was used
    # Another embedding under the same name is another encoding: the re-run says so.
    save_file({"emb_params": torch.zeros(1, 128)}, str(folder / "style.safetensors"))
    with pytest.raises(DatasetError, match="different options: embeddings"):
        _encode(path, tiny_model, tmp_path / "out", embeddings=folder, normalization="mean", shard_rows=2)


def test_clip_type_and_its_old_name_kind_are_one_option(tmp_path, captions, tiny_model, capsys):
    argv = [str(captions[0]), "--model", str(tiny_model), "--limit", "5", "--no-progress", "--dtype", "fp32"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--clip-type", "sd1"]) == 0
    assert main([*argv, "--out", str(tmp_path / "b"), "--kind", "sd1"]) == 0
    assert _manifest(tmp_path / "a")["options"] == _manifest(tmp_path / "b")["options"]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "c"), "--clip-type", "sd2"]) == 1  # an SD1 model
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(DatasetError, match="kind is the old name of clip_type"):
        _encode(captions[0], tiny_model, tmp_path / "d", clip_type="sd1", kind="sd2")
    _encode(captions[0], tiny_model, tmp_path / "e", kind="sd1", limit=5)  # the Python keyword too
    help_text = configure_parser(argparse.ArgumentParser()).format_help()
    assert "--clip-type" in help_text and "--kind" not in help_text and "--on-missing-embedding" in help_text


def test_a_missing_embedding_warns_or_is_an_error(tmp_path, styled, tiny_model):
    from textenc.errors import EmbeddingError

    path, folder = styled
    with pytest.warns(EmbeddingWarning, match="embedding:style read as text"):
        _encode(path, tiny_model, tmp_path / "warn")  # no folder: ComfyUI's text, with a warning
    with pytest.raises(EmbeddingError, match="embedding:style read as text.*on_missing_embedding='error'"):
        _encode(path, tiny_model, tmp_path / "none", on_missing_embedding="error")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbeddingError, match="embedding:style skipped \\(missing"):
        _encode(path, tiny_model, tmp_path / "other", embeddings=tmp_path / "empty", on_missing_embedding="error")
    with pytest.raises(DatasetError, match="on_missing_embedding 'fatal'"):
        _encode(path, tiny_model, tmp_path / "bad", on_missing_embedding="fatal")
    _encode(path, tiny_model, tmp_path / "ok", embeddings=folder, on_missing_embedding="error")
