"""compel's ``truncate_long_prompts`` at every entry point, against compel 2.5.1.

One option, one meaning, one default (True, compel's) wherever ``syntax="compel"``
is taken: ``CLIP.tokenize``/``encode``/``encode_scheduled``, ``textenc encode`` and
``textenc inspect`` (``--no-truncate-long-prompts``), ``encode_dataset`` and its two
command lines (recorded in the manifest; a resume with another value is refused),
``encode_for_pipeline`` (rows padded as compel pads them) and the advanced encode
node. The oracle is the real compel: ``Compel(..., truncate_long_prompts=False)`` on
the tiny SDXL encoders of ``test_compel_sdxl`` (fixture ``sdxl``), and compel's own
``CompelForSD`` / ``CompelForSDXL`` wrappers (both ``truncate_long_prompts=False``)
on the tiny diffusers pipelines of ``test_diffusers``. Tolerance 1e-5 (fp32).

With another syntax the option means nothing: True is accepted, False refused
(``PromptError`` naming the option and the syntax; exit 2 on a command line).
"""

from __future__ import annotations

import json

import pytest
import torch

compel = pytest.importorskip("compel")
pytest.importorskip("diffusers")

import compel_prompts  # noqa: E402
from compel_prompts import LONG_SENTENCES, LONG_TAGS  # noqa: E402
from safetensors import safe_open  # noqa: E402
from test_compel_sdxl import compel_encode, max_error, sdxl, textenc_encode  # noqa: E402,F401
from test_diffusers import _build_pipeline  # noqa: E402
from textenc.cli import main  # noqa: E402
from textenc.errors import DatasetError, PromptError  # noqa: E402
from textenc.prompts.tokenizer import SDTokenizer  # noqa: E402

NEGATIVE = "ugly, (blurry)0.5"
REFUSED = r"truncate_long_prompts=False is an option of syntax='compel' only; syntax='{}'"


@pytest.fixture(scope="module", autouse=True)
def one_compel_parser():
    with compel_prompts.one_compel_parser(compel) as parser:
        yield parser


def model_file(sdxl) -> str:
    return str(sdxl["folder"] / "sdxl.safetensors")


# ---- Python API ------------------------------------------------------------------------

def test_clip_entry_points_chunk_as_compel_without_truncation(sdxl, one_compel_parser):
    clip = sdxl["clip"]
    theirs = compel_encode(sdxl, one_compel_parser, LONG_SENTENCES, truncate=False)
    assert theirs[0].shape[1] >= 154
    max_error(textenc_encode(sdxl, LONG_SENTENCES, truncate_long_prompts=False)[0], theirs[0], "tokenize")
    max_error(clip.encode(LONG_SENTENCES, syntax="compel", truncate_long_prompts=False), theirs[0], "encode")
    (cond, extra), = clip.encode_scheduled(LONG_SENTENCES, steps=4, syntax="compel", truncate_long_prompts=False)
    max_error(cond, theirs[0], "encode_scheduled")
    max_error(extra["pooled_output"], theirs[1], "encode_scheduled pooled")
    truncated = compel_encode(sdxl, one_compel_parser, LONG_SENTENCES, truncate=True)[0]
    max_error(clip.encode(LONG_SENTENCES, syntax="compel"), truncated, "default")
    max_error(clip.encode(LONG_SENTENCES, syntax="compel", truncate_long_prompts=True), truncated, "True")


@pytest.mark.parametrize("syntax", ["comfy", "a1111", None])
def test_other_syntaxes_refuse_false_and_accept_the_default(sdxl, syntax):
    clip, tokenizer = sdxl["clip"], SDTokenizer()
    given = {} if syntax is None else {"syntax": syntax}
    match = REFUSED.format(syntax or "comfy")
    calls = [lambda **kw: tokenizer.tokenize_with_weights(LONG_TAGS, **given, **kw),
             lambda **kw: tokenizer.inspect(LONG_TAGS, **given, **kw),
             lambda **kw: clip.tokenize(LONG_TAGS, **given, **kw),
             lambda **kw: clip.encode(LONG_TAGS, **given, **kw),
             lambda **kw: clip.encode_scheduled(LONG_TAGS, steps=2, **given, **kw)]
    for call in calls:
        with pytest.raises(PromptError, match=match):
            call(truncate_long_prompts=False)
        with pytest.raises(PromptError, match="truncate_long_prompts='no'"):
            call(truncate_long_prompts="no")
    assert clip.tokenize(LONG_TAGS, **given, truncate_long_prompts=True) == clip.tokenize(LONG_TAGS, **given)
    assert torch.equal(clip.encode(LONG_TAGS, **given, truncate_long_prompts=True), clip.encode(LONG_TAGS, **given))


# ---- textenc encode / inspect -------------------------------------------------------------

def test_cli_encode_with_the_flag_is_compel_without_truncation(sdxl, one_compel_parser, tmp_path, capsys):
    out = tmp_path / "long.safetensors"
    assert main(["encode", LONG_SENTENCES, "--syntax", "compel", "--no-truncate-long-prompts",
                 "--model", model_file(sdxl), "--out", str(out)]) == 0
    theirs = compel_encode(sdxl, one_compel_parser, LONG_SENTENCES, truncate=False)
    with safe_open(str(out), "pt") as handle:
        max_error(handle.get_tensor("cond_0"), theirs[0], "cli cond")
        max_error(handle.get_tensor("pooled_0"), theirs[1], "cli pooled")
        assert json.loads(handle.metadata()["options"])["truncate_long_prompts"] is False
    default = tmp_path / "default.safetensors"
    assert main(["encode", LONG_SENTENCES, "--syntax", "compel", "--model", model_file(sdxl),
                 "--out", str(default)]) == 0
    with safe_open(str(default), "pt") as handle:
        cond = handle.get_tensor("cond_0")
        assert json.loads(handle.metadata()["options"])["truncate_long_prompts"] is True
    max_error(cond, compel_encode(sdxl, one_compel_parser, LONG_SENTENCES, truncate=True)[0], "cli default")


def test_cli_inspect_with_the_flag_shows_compels_chunks(sdxl, one_compel_parser, capsys):
    theirs = compel_encode(sdxl, one_compel_parser, LONG_SENTENCES, truncate=False)[0]
    assert main(["inspect", LONG_SENTENCES, "--syntax", "compel", "--no-truncate-long-prompts", "--json"]) == 0
    chunked = json.loads(capsys.readouterr().out)
    assert len(chunked["windows"]) * 77 == theirs.shape[1]
    assert main(["inspect", LONG_SENTENCES, "--syntax", "compel", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["windows"]) == 1


@pytest.mark.parametrize("command", ["encode", "inspect", "encode-dataset", "python -m textenc.dataset"])
@pytest.mark.parametrize("syntax", ["comfy", "a1111"])
def test_cli_flag_with_another_syntax_is_a_usage_error(command, syntax, tmp_path, capsys):
    rest = {"encode": ["encode", "a cat", "--model", "m.safetensors", "--out", str(tmp_path / "o.safetensors")],
            "inspect": ["inspect", "a cat"],
            "encode-dataset": ["encode-dataset", "in.txt", "--model", "m", "--out", str(tmp_path / "o")]}
    flags = ["--syntax", syntax, "--no-truncate-long-prompts"]
    if command == "python -m textenc.dataset":
        from textenc.dataset.cli import main as dataset_main

        with pytest.raises(SystemExit) as done:
            dataset_main(["in.txt", "--model", "m", "--out", str(tmp_path / "o"), *flags])
        status, prog = done.value.code, "python -m textenc.dataset"
    else:
        status, prog = main(rest[command] + flags), f"textenc {command}"
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: error: --no-truncate-long-prompts is an option of --syntax compel only")
    assert f"--syntax {syntax} has no such option" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.safetensors").exists()


def test_cli_help_documents_the_flag(capsys):
    for argv in (["encode", "--help"], ["inspect", "--help"], ["encode-dataset", "--help"]):
        assert main(argv) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--no-truncate-long-prompts --syntax compel only" in text, argv
        assert "(default: off: compel's default, one window with the first 75 tokens)" in text, argv


# ---- encode_dataset ----------------------------------------------------------------------

def _captions(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text(f"{LONG_SENTENCES}\n{LONG_TAGS}\na (cat)0.5 on a mat\n", encoding="utf-8")
    return path, [LONG_SENTENCES, LONG_TAGS, "a (cat)0.5 on a mat"]


def test_dataset_with_the_option_is_compel_and_recorded(sdxl, one_compel_parser, tmp_path):
    from textenc.dataset import encode_dataset, open_shards
    from textenc.dataset.format import read_manifest

    path, prompts = _captions(tmp_path)
    out = tmp_path / "out"
    encode_dataset(path, model=model_file(sdxl), out=out, syntax="compel", truncate_long_prompts=False,
                   dtype="fp32", threads=1, progress=False)
    rows = {row: (cond, pooled) for row, cond, pooled in open_shards(out)}
    for row, prompt in enumerate(prompts):
        cond, pooled = compel_encode(sdxl, one_compel_parser, prompt, truncate=False)
        max_error(rows[row][0].unsqueeze(0), cond, prompt)
        max_error(rows[row][1].unsqueeze(0), pooled, prompt + " (pooled)")
    assert rows[0][0].shape[0] >= 154
    assert read_manifest(out)["options"]["truncate_long_prompts"] is False
    with pytest.raises(DatasetError, match="different options: truncate_long_prompts false -> true"):
        encode_dataset(path, model=model_file(sdxl), out=out, syntax="compel", dtype="fp32", threads=1,
                       progress=False)
    # the same value resumes (nothing to redo), also from the command line with the flag
    from textenc.dataset.cli import main as dataset_main

    assert dataset_main([str(path), "--model", model_file(sdxl), "--out", str(out), "--syntax", "compel",
                         "--no-truncate-long-prompts", "--dtype", "fp32", "--threads", "1",
                         "--no-progress"]) == 0
    assert read_manifest(out)["options"]["truncate_long_prompts"] is False


def test_dataset_cli_without_the_flag_truncates_and_records_true(sdxl, one_compel_parser, tmp_path, capsys):
    from textenc.dataset import open_shards
    from textenc.dataset.format import read_manifest

    path, prompts = _captions(tmp_path)
    out = tmp_path / "out"
    assert main(["encode-dataset", str(path), "--model", model_file(sdxl), "--out", str(out), "--syntax",
                 "compel", "--dtype", "fp32", "--threads", "1", "--no-progress"]) == 0
    assert read_manifest(out)["options"]["truncate_long_prompts"] is True
    (_, cond, _), = [r for r in open_shards(out) if r[0] == 0]
    max_error(cond.unsqueeze(0), compel_encode(sdxl, one_compel_parser, prompts[0], truncate=True)[0], "cli")
    assert main(["encode-dataset", str(path), "--model", model_file(sdxl), "--out", str(out), "--syntax",
                 "compel", "--no-truncate-long-prompts", "--dtype", "fp32", "--threads", "1"]) == 1
    assert "truncate_long_prompts true -> false" in capsys.readouterr().err


def test_dataset_refuses_false_with_another_syntax_before_writing(sdxl, tmp_path):
    from textenc.dataset import encode_dataset
    from textenc.dataset.format import read_manifest

    path, _ = _captions(tmp_path)
    with pytest.raises(PromptError, match=REFUSED.format("comfy")):
        encode_dataset(path, model=model_file(sdxl), out=tmp_path / "out", truncate_long_prompts=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DatasetError, match="truncate_long_prompts must be True or False"):
        encode_dataset(path, model=model_file(sdxl), out=tmp_path / "out", syntax="compel",
                       truncate_long_prompts="no")
    encode_dataset(path, model=model_file(sdxl), out=tmp_path / "out", syntax="a1111", truncate_long_prompts=True,
                   threads=1, progress=False)
    assert read_manifest(tmp_path / "out")["options"]["truncate_long_prompts"] is None


# ---- encode_for_pipeline -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipelines():
    pipes = {kind: _build_pipeline(kind) for kind in ("sd1", "sdxl")}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def test_encode_for_pipeline_pads_as_compel_for_sd(tiny_pipelines):
    from compel.convenience_wrappers import CompelForSD
    from textenc.diffusers import encode_for_pipeline

    pipe, prompts = tiny_pipelines["sd1"], [LONG_SENTENCES, "a (cat)0.5 on a mat"]
    with torch.no_grad():
        theirs = CompelForSD(pipe)(prompts, negative_prompt=NEGATIVE)
    ours = encode_for_pipeline(pipe, prompts, NEGATIVE, syntax="compel", truncate_long_prompts=False)
    assert ours["prompt_embeds"].shape[1] == theirs.embeds.shape[1] >= 154
    max_error(ours["prompt_embeds"], theirs.embeds, "sd1 prompt_embeds")
    max_error(ours["negative_prompt_embeds"], theirs.negative_embeds, "sd1 negative_prompt_embeds")
    assert encode_for_pipeline(pipe, prompts, NEGATIVE, syntax="compel")["prompt_embeds"].shape[1] == 77


def test_encode_for_pipeline_pads_as_compel_for_sdxl(tiny_pipelines):
    from compel.convenience_wrappers import CompelForSDXL
    from textenc.diffusers import encode_for_pipeline

    pipe = tiny_pipelines["sdxl"]
    with torch.no_grad():
        theirs = CompelForSDXL(pipe)(LONG_SENTENCES, negative_prompt=NEGATIVE)
    ours = encode_for_pipeline(pipe, LONG_SENTENCES, NEGATIVE, syntax="compel", truncate_long_prompts=False)
    assert ours["negative_prompt_embeds"].shape[1] == theirs.negative_embeds.shape[1] >= 154
    for name, value in (("prompt_embeds", theirs.embeds), ("negative_prompt_embeds", theirs.negative_embeds),
                        ("pooled_prompt_embeds", theirs.pooled_embeds),
                        ("negative_pooled_prompt_embeds", theirs.negative_pooled_embeds)):
        max_error(ours[name], value, name)


def test_encode_for_pipeline_refuses_false_with_another_syntax(tiny_pipelines):
    from textenc.diffusers import encode_for_pipeline

    pipe = tiny_pipelines["sd1"]
    for syntax in ("comfy", "a1111"):
        with pytest.raises(PromptError, match=REFUSED.format(syntax)):
            encode_for_pipeline(pipe, LONG_TAGS, syntax=syntax, truncate_long_prompts=False)
    same = encode_for_pipeline(pipe, LONG_TAGS, truncate_long_prompts=True)
    assert torch.equal(same["prompt_embeds"], encode_for_pipeline(pipe, LONG_TAGS)["prompt_embeds"])


# ---- the advanced encode node -------------------------------------------------------------

def test_advanced_node_takes_the_option(sdxl, one_compel_parser, pack):
    node = pack.NODE_CLASS_MAPPINGS["CLIPTextEncodeAdvancedTextenc"]
    declared = node.INPUT_TYPES()["optional"]["truncate_long_prompts"]
    assert declared[0] == "BOOLEAN" and declared[1]["default"] is True and "compel" in declared[1]["tooltip"]
    base = {"clip": sdxl["clip"], "text": LONG_SENTENCES}
    (conditioning,) = node().encode(**base, syntax="compel", truncate_long_prompts=False)
    theirs = compel_encode(sdxl, one_compel_parser, LONG_SENTENCES, truncate=False)
    max_error(conditioning[0][0], theirs[0], "node cond")
    max_error(conditioning[0][1]["pooled_output"], theirs[1], "node pooled")
    with pytest.raises(PromptError, match="CLIPTextEncodeAdvancedTextenc: " + REFUSED.format("a1111")):
        node().encode(**base, syntax="a1111", truncate_long_prompts=False)
    with pytest.raises(PromptError, match="truncate_long_prompts must be true or false"):
        node().encode(**base, syntax="compel", truncate_long_prompts="no")
    (plain,) = node().encode(**base, truncate_long_prompts=True)
    assert torch.equal(plain[0][0], node().encode(**base)[0][0][0])
