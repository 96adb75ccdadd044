"""``textenc encode`` / ``inspect`` with SD3, Flux and Wan (issue 26 point 3): several ``--model``
files, the new ``--clip-type`` values, the metadata naming every file and the family, inspect's
parts (T5 pieces with their weights, lengths, padding), and one-line errors with the usual exit
statuses. The outputs equal the library API's for the same inputs; the T5 token ids equal those
of the ``tokenizers`` library's own reading of the bundled tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from family_fixtures import TinyFamily, weights
from t5_fixtures import save_safetensors, scaled_fp8
from textenc.cli import main
from textenc.sd import load_clip
from textenc.text_encoders.t5 import T5_VOCAB

FP8 = "t5xxl_fp8_e4m3fn_scaled.safetensors"
PROMPTS = ["a (red:1.2) fox", "a photo of a cat"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyFamily:
    family = TinyFamily(tmp_path_factory.mktemp("families"))
    file, _ = scaled_fp8(weights(family.t5))
    family.paths["fp8"] = save_safetensors(family.folder / FP8, file)
    return family


def _encode(tmp_path: Path, *arguments: str) -> tuple[dict, dict]:
    out = tmp_path / "out.safetensors"
    assert main(["encode", *PROMPTS, *arguments, "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        options = json.loads(handle.metadata()["options"])
    return tensors, options


def _models(tiny, *keys: str) -> list[str]:
    return [word for key in keys for word in ("--model", str(tiny.paths[key]))]


def test_encode_flux_with_an_fp8_t5_equals_the_library(tiny, tmp_path):
    tensors, options = _encode(tmp_path, *_models(tiny, "l", "fp8"), "--clip-type", "flux")
    library = load_clip([tiny.paths["l"], tiny.paths["fp8"]], clip_type="flux")
    for index, prompt in enumerate(PROMPTS):
        cond, pooled = library.encode_from_tokens(library.tokenize(prompt), return_pooled=True)
        assert torch.equal(tensors[f"cond_{index}"], cond) and torch.equal(tensors[f"pooled_{index}"], pooled)
    assert tensors["cond_0"].shape == (1, 256, 192)
    assert {k: options[k] for k in ("clip_type", "family", "parts", "models", "layer")} == {
        "clip_type": "flux", "family": "Flux", "parts": ["l", "t5xxl"],
        "models": ["clip_l.safetensors", FP8], "layer": -1}


def test_encode_detects_flux_from_a_clip_l_and_t5_pair(tiny, tmp_path):
    _, options = _encode(tmp_path, *_models(tiny, "t5", "l"))
    assert options["clip_type"] == "flux" and options["models"] == ["t5xxl_fp32.safetensors", "clip_l.safetensors"]


def test_encode_sd3_keeps_each_parts_own_layer(tiny, tmp_path):
    """Without --clip-skip no layer is passed: SD3's CLIP parts stay at their penultimate layer
    and T5 at its last (ComfyUI without CLIPSetLastLayer); the metadata says null."""
    tensors, options = _encode(tmp_path, *_models(tiny, "l", "g", "t5"), "--clip-type", "sd3")
    library = load_clip([tiny.paths[k] for k in ("l", "g", "t5")], clip_type="sd3")
    cond, pooled = library.encode_from_tokens(library.tokenize(PROMPTS[0]), return_pooled=True)
    assert torch.equal(tensors["cond_0"], cond) and torch.equal(tensors["pooled_0"], pooled)
    assert (options["layer"], options["parts"], options["family"]) == (None, ["l", "g", "t5xxl"], "SD3")
    skipped, options = _encode(tmp_path, *_models(tiny, "l", "g", "t5"), "--clip-type", "sd3", "--clip-skip", "2")
    expected = library.encode_from_tokens(library.tokenize(PROMPTS[0]), options={"layer": -2})
    assert options["layer"] == -2 and torch.equal(skipped["cond_0"], expected)


def test_encode_sd3_subset_and_wan_without_pooled(tiny, tmp_path):
    _, options = _encode(tmp_path, *_models(tiny, "l", "t5"), "--clip-type", "sd3")
    assert options["parts"] == ["l", "t5xxl"] and options["clip_type"] == "sd3"
    tensors, options = _encode(tmp_path, *_models(tiny, "umt5"), "--clip-type", "wan")
    assert sorted(tensors) == ["cond_0", "cond_1"] and tensors["cond_0"].shape == (1, 512, 192)
    library = load_clip([tiny.paths["umt5"]], clip_type="wan")
    assert torch.equal(tensors["cond_1"], library.encode_from_tokens(library.tokenize(PROMPTS[1])))
    assert (options["family"], options["layer"]) == ("Wan", -1)


def _t5_ids(text: str) -> list[int]:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(Path(T5_VOCAB) / "tokenizer.json")).encode(text).ids


def test_inspect_shows_every_part(tiny, capsys):
    assert main(["inspect", "a photo of a cat", *_models(tiny, "l", "t5"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clip_type"] == "flux" and list(report["parts"]) == ["l", "t5xxl"]
    t5 = report["parts"]["t5xxl"]
    ids = _t5_ids("a photo of a cat")  # ends with </s>
    assert [t["token"] for t in t5["windows"][0][:len(ids)]] == ids
    assert (t5["tokens"], t5["prompt_tokens"], t5["padding"], t5["min_length"]) == \
        (256, len(ids) - 1, 256 - len(ids), 256)
    assert main(["inspect", "a (red:1.2) fox", "--clip-type", "sd3"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("sd3: 3 parts (l, g, t5xxl)")
    assert "part t5xxl: 77 tokens, 5 from the prompt, 71 padding (minimum length 77)" in table
    assert "1.2     2  ▁red" in table  # the weighted T5 piece with its weight


def test_inspect_flux_compel_shows_compels_t5_length_and_no_refused_flag(capsys):
    # CompelForFlux: one T5 chunk of 512 tokens, always truncated (compel 2.5.1; its
    # truncate_long_prompts=False is refused for Flux, so inspect must not suggest it).
    long_prompt = " ".join(["a red fox"] * 200)
    assert main(["inspect", long_prompt, "--clip-type", "flux", "--syntax", "compel"]) == 0
    table, warning = capsys.readouterr()
    total = len(_t5_ids(long_prompt)) - 1  # without </s>; compel keeps 511 of them beside it
    assert f"dropped {total - 511} of the prompt's {total} tokens" in warning and "CompelForFlux truncates" in warning
    part = next(line for line in table.splitlines() if line.startswith("part t5xxl:"))
    assert part.startswith("part t5xxl: 512 tokens, 511 from the prompt, 0 padding")
    assert "minimum length" not in part  # ComfyUI's 256 does not apply to compel's reading
    truncated = next(line for line in table.splitlines() if line.strip().startswith("truncated:"))
    assert "--no-truncate-long-prompts" not in truncated and "CompelForFlux" in truncated
    assert main(["inspect", "a red fox", "--clip-type", "flux", "--syntax", "compel"]) == 0
    short = len(_t5_ids("a red fox"))  # with </s>
    assert f"part t5xxl: 512 tokens, {short - 1} from the prompt, {512 - short} padding\n" in capsys.readouterr().out


def test_inspect_tokenizer_picks_one_part(tiny, capsys):
    assert main(["inspect", "a cat", "--clip-type", "sd3", "--tokenizer", "sdxl-g", "--json"]) == 0
    window = json.loads(capsys.readouterr().out)["windows"][0]
    assert window[-1]["token"] == 0  # CLIP-G pads with 0


@pytest.mark.parametrize("arguments,status,words", [
    (("encode", "a", "--model", "{umt5}", "--clip-type", "flux"), 1, "UMT5"),
    (("encode", "a", "--model", "{t5}", "--clip-type", "wan"), 1, "T5"),
    (("encode", "a", "--model", "{t5}", "--clip-type", "sd1"), 1, "--clip-type sd1 (SD1) takes CLIP-L"),
    (("encode", "a", "--model", "{umt5_bare}"), 1, "spiece_model"),
    (("encode", "a", "--model", "{t5}"), 1, "cannot tell the model type"),
    (("encode", "a", "--model", "{l}", "--clip-type", "mochi"), 2, "invalid choice: 'mochi'"),
    (("inspect", "a", "--model", "{l}", "--model", "{t5}", "--tokenizer", "sd2"), 1, "no 'h' part"),
    (("inspect", "a", "--clip-type", "wan"), 1, "give the model's file with --model"),
])
def test_bad_combinations_are_one_line_errors(tiny, tmp_path, capsys, arguments, status, words):
    argv = [a.format(**{k: str(v) for k, v in tiny.paths.items()}) for a in arguments]
    if argv[0] == "encode":
        argv += ["--out", str(tmp_path / "x.safetensors")]
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and err.startswith("textenc")
