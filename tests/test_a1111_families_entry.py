"""``syntax="a1111"`` on SD3 and Flux through every entry point: the CLI (a subprocess), the
diffusers helper and the advanced encode node give what the library gives
(``tests/test_a1111_families.py`` checks the library against A1111's and Forge's rules); Wan
refuses it naming the syntaxes that apply. The dataset encoder: ``tests/test_dataset_families.py``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dataset_fixtures import checkout_env
from family_fixtures import TinyFamily
from textenc.errors import PromptError, TextencError
from test_nodes import run
from textenc.sd import load_clip

pytest.importorskip("transformers")
PROMPTS = ["a (red:1.3) fox in the [snow]", "one BREAK two, " + "tall grass, " * 30]
FILES = {"sd3": ("l", "g", "t5"), "flux": ("l", "t5"), "wan": ("umt5",)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyFamily:
    return TinyFamily(tmp_path_factory.mktemp("a1111entry"))


def _cli(tiny, tmp_path, kind: str, prompts: list[str]) -> subprocess.CompletedProcess:
    models = [word for key in FILES[kind] for word in ("--model", str(tiny.paths[key]))]
    return subprocess.run([sys.executable, "-m", "textenc", "encode", *prompts, *models, "--clip-type", kind,
                           "--syntax", "a1111", "--out", str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, env=checkout_env(), timeout=600)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_cli_encodes_sd3_and_flux_as_the_library(tiny, tmp_path, kind):
    prompts = PROMPTS if kind == "sd3" else PROMPTS[:1]  # Flux refuses BREAK (Forge gives it no meaning)
    done = _cli(tiny, tmp_path, kind, prompts)
    assert done.returncode == 0, done.stderr
    tensors = load_file(str(tmp_path / "out.safetensors"))
    library = load_clip([tiny.paths[key] for key in FILES[kind]], clip_type=kind)
    for index, prompt in enumerate(prompts):
        cond, pooled = library.encode_from_tokens(library.tokenize(prompt, syntax="a1111"), return_pooled=True,
                                                  options={"weight_mode": "a1111"})
        torch.testing.assert_close(tensors[f"cond_{index}"], cond, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tensors[f"pooled_{index}"], pooled, rtol=1e-5, atol=1e-6)


def test_cli_refuses_a1111_on_wan_and_break_on_flux(tiny, tmp_path):
    done = _cli(tiny, tmp_path, "wan", ["a cat"])
    assert done.returncode != 0 and "syntax='a1111' is not defined for UMT5 (Wan)" in done.stderr
    assert "the syntaxes that apply: 'comfy'" in done.stderr
    done = _cli(tiny, tmp_path, "flux", ["a cat BREAK a dog"])
    assert done.returncode != 0 and "BREAK in a Flux prompt" in done.stderr
    assert not (tmp_path / "out.safetensors").exists()


# ---- diffusers helper ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipes():
    pytest.importorskip("diffusers")
    import pipeline_fixtures as fixtures
    torch.set_num_threads(1)
    return {"sd3": fixtures.sd3_pipeline(), "flux": fixtures.flux_pipeline()}


def test_diffusers_sd3_pads_the_shorter_cond_as_a1111(pipes):
    """Prompt (3 chunks: BREAK, then 92 tokens) and negative (1): each encoded alone as A1111's SD3; the shorter gets
    the empty prompt's whole cond appended (A1111's ``pad_cond``)."""
    from textenc.diffusers import encode_for_pipeline, load_from_diffusers

    pipe = pipes["sd3"]
    got = encode_for_pipeline(pipe, PROMPTS[1], "blurry", syntax="a1111")
    clip = load_from_diffusers(pipe)
    options = {"weight_mode": "a1111"}
    cond, pooled = clip.encode_from_tokens(clip.tokenize(PROMPTS[1], syntax="a1111"), return_pooled=True,
                                           options=options)
    negative, negative_pooled = clip.encode_from_tokens(clip.tokenize("blurry", syntax="a1111"),
                                                        return_pooled=True, options=options)
    empty = clip.encode_from_tokens(clip.tokenize("", syntax="a1111"), options=options)
    assert cond.shape[1] == 3 * 154 and negative.shape[1] == empty.shape[1] == 154
    torch.testing.assert_close(got["prompt_embeds"], cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["negative_prompt_embeds"], torch.cat([negative, empty, empty], dim=1),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["pooled_prompt_embeds"], pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["negative_pooled_prompt_embeds"], negative_pooled, rtol=1e-5, atol=1e-6)
    with pytest.raises(TextencError, match="max_sequence_length=256: with syntax='a1111'"):
        encode_for_pipeline(pipe, PROMPTS[0], syntax="a1111", max_sequence_length=256)


def test_diffusers_flux_equals_the_library(pipes):
    from textenc.diffusers import encode_for_pipeline, load_from_diffusers

    pipe = pipes["flux"]
    got = encode_for_pipeline(pipe, PROMPTS[0], syntax="a1111")
    clip = load_from_diffusers(pipe)
    cond, pooled = clip.encode_from_tokens(clip.tokenize(PROMPTS[0], syntax="a1111"), return_pooled=True,
                                           options={"weight_mode": "a1111"})
    torch.testing.assert_close(got["prompt_embeds"], cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["pooled_prompt_embeds"], pooled, rtol=1e-5, atol=1e-6)
    with pytest.raises(PromptError, match="BREAK in a Flux prompt"):
        encode_for_pipeline(pipe, "a BREAK b", syntax="a1111")


# ---- nodes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd3", "flux", "wan"])
def test_advanced_node_reads_a1111_where_defined(pack, tiny, kind):  # noqa: F811
    clip = load_clip([tiny.paths[key] for key in FILES[kind]], clip_type=kind)
    if kind == "wan":
        with pytest.raises(PromptError, match="the syntaxes that apply: 'comfy'"):
            run(pack, "CLIPTextEncodeAdvancedTextenc", clip=clip, text=PROMPTS[0], syntax="a1111")
        return
    ((cond, extras),), = run(pack, "CLIPTextEncodeAdvancedTextenc", clip=clip, text=PROMPTS[0], syntax="a1111")
    want, want_pooled = clip.encode_from_tokens(clip.tokenize(PROMPTS[0], syntax="a1111"), return_pooled=True,
                                                options={"weight_mode": "a1111"})
    assert torch.equal(cond, want) and torch.equal(extras["pooled_output"], want_pooled)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_cli_inspect_shows_the_family_reading_of_t5(tiny, kind, capsys):
    """``textenc inspect --syntax a1111``: the T5 part as the family reads it (SD3: cut or padded to
    CLIP's rows, unweighted; Flux: weighted, 256), the CLIP parts as A1111 chunks them."""
    import json

    from textenc.cli import main

    models = [word for key in FILES[kind] for word in ("--model", str(tiny.paths[key]))]
    assert main(["inspect", PROMPTS[0], *models, "--clip-type", kind, "--syntax", "a1111", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["parts"]
    library = load_clip([tiny.paths[key] for key in FILES[kind]], clip_type=kind)
    tokens = library.tokenize(PROMPTS[0], return_word_ids=True, syntax="a1111")
    for role, windows in tokens.items():
        shown = report[role]["windows"]
        assert [[(t["token"], t["weight"], t["word_id"]) for t in w] for w in shown] == \
            [[(int(t), float(w), int(i)) for t, w, i in window] for window in windows], role
    assert report["t5xxl"]["tokens"] == (77 if kind == "sd3" else 256)
    assert [u["text"] for u in report["t5xxl"]["units"]] == ["a ", "red", " fox in the ", "snow"]


def test_cli_inspect_refuses_a1111_on_wan(tiny, capsys):
    from textenc.cli import main

    assert main(["inspect", "a cat", "--model", str(tiny.paths["umt5"]), "--syntax", "a1111"]) != 0
    assert "the syntaxes that apply: 'comfy'" in capsys.readouterr().err
