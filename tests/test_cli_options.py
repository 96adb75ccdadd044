"""One meaning per command-line option (issue 16) and explicit defaults (issue 19.9).

References are transformers' hidden states of the same tiny random weights
(``test_sd1_clip``'s oracles) and the documented numbering rule: A1111's and
civitai's clip skip ``n`` is ComfyUI's ``CLIPSetLastLayer`` index ``-n``
(1 = last layer, 2 = penultimate); SD2 and SDXL default to the penultimate
layer, SD1 to the last; SD1/SD2 apply the final layer norm, SDXL does not.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from test_sd1_clip import END, hf_run, hf_state, make_hf
from textenc.cli import build_parser, main
from textenc.loading.convert import to_layout
from textenc.errors import LayerError
from textenc.sd import load_clip
from textenc.prompts.tokenizer import DEFAULT_VOCAB

transformers = pytest.importorskip("transformers")

PROMPT = "a photo of a red fox"
PADS = {"l": END, "h": 0, "g": 0}
ROLES = {"sd1": ("l",), "sd2": ("h",), "sdxl": ("l", "g")}
DEFAULT_LAYER = {"sd1": -1, "sd2": -2, "sdxl": -2}


@pytest.fixture(scope="module")
def hf() -> dict:
    return {"l": make_hf("quick_gelu", 11), "h": make_hf("gelu", 12), "g": make_hf("gelu", 13)}


@pytest.fixture(scope="module")
def models(hf, tmp_path_factory) -> dict[str, Path]:
    """Checkpoint files of every kind in its real key layout (3 layers each)."""
    folder = tmp_path_factory.mktemp("cli_models")
    states = {"sd1": to_layout(hf_state(hf["l"], projection=False), "sd1"),
              "sd2": to_layout(hf_state(hf["h"]), "sd2"),
              "sdxl": {**to_layout(hf_state(hf["l"], projection=False), "sdxl_l"),
                       **to_layout(hf_state(hf["g"]), "sdxl_g")}}
    paths = {}
    for kind, state in states.items():
        paths[kind] = folder / f"{kind}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(paths[kind]))
    return paths


def _ids(role: str) -> list[int]:
    ids = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)(PROMPT)["input_ids"]
    return ids + [PADS[role]] * (77 - len(ids))


def _reference(hf, kind: str, layer: int) -> torch.Tensor:
    """transformers' hidden state at ComfyUI index ``layer`` (negative: hidden_states[layer])."""
    parts = []
    for role in ROLES[kind]:
        hidden = hf_run(hf[role], _ids(role)).hidden_states[layer]
        if kind != "sdxl":
            with torch.no_grad():
                hidden = hf[role].text_model.final_layer_norm(hidden)
        parts.append(hidden)
    return torch.cat(parts, dim=-1)


def _encode(model: Path, out: Path, *options: str) -> tuple[dict, dict]:
    assert main(["encode", PROMPT, "--model", str(model), "--out", str(out), *options]) == 0
    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
    return load_file(out), json.loads(metadata["options"])


# --- clip skip ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("clip_skip", [None, 1, 2, 3, -1, -2, -3])
def test_clip_skip_is_a1111_numbering_on_every_kind(hf, models, tmp_path, capsys, kind, clip_skip):
    layer = DEFAULT_LAYER[kind] if clip_skip is None else -abs(clip_skip)
    options = () if clip_skip is None else ("--clip-skip", str(clip_skip))
    tensors, recorded = _encode(models[kind], tmp_path / "o.safetensors", *options)
    torch.testing.assert_close(tensors["cond_0"], _reference(hf, kind, layer), atol=1e-5, rtol=0)
    assert recorded["layer"] == layer and recorded["clip_type"] == kind
    assert f"layer {layer})" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("clip_skip", ["0", "4", "-4", "30"])
def test_clip_skip_outside_the_depth_is_one_line_and_exit_1(models, tmp_path, capsys, kind, clip_skip):
    out = tmp_path / "o.safetensors"
    assert main(["encode", PROMPT, "--model", str(models[kind]), "--out", str(out),
                 "--clip-skip", clip_skip]) == 1
    err = capsys.readouterr().err
    # on the command line the option is named as typed there (--clip-skip), not as the Python keyword
    assert err.startswith(f"textenc: error: --clip-skip {clip_skip.lstrip('-')}") or \
        err.startswith(f"textenc: error: --clip-skip {clip_skip}")
    assert err.count("\n") == 1 and ("3-layer" in err or "1 is the last layer" in err)
    assert not out.exists()


def test_clip_layer_is_checked_at_call_and_options_at_encode(models):
    """ComfyUI numbering in Python: -3..2 fit a 3-layer model, -4 and 3 do not."""
    for kind in ("sd1", "sdxl"):
        clip = load_clip(models[kind])
        tokens = clip.tokenize(PROMPT)
        for bad in (-4, 3):
            with pytest.raises(LayerError, match=f"layer {bad} is out of range for a 3-layer"):
                clip.clip_layer(bad)
            assert clip.layer_idx is None  # the refused value was not kept
            with pytest.raises(LayerError, match=f"layer {bad} is out of range"):
                clip.encode_from_tokens(tokens, options={"layer": bad})
            with pytest.raises(LayerError, match=f"layer {bad} is out of range"):
                clip.cond_stage_model.set_clip_options({"layer": bad})
        clip.clip_layer(-3)
        assert clip.layer_idx == -3 and clip.num_layers == 3


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_python_layer_is_comfy_numbering_on_every_kind(hf, models, kind):
    """``clip_layer(i)`` and ``options={"layer": i}``: negative from the end, positive from the
    start (ComfyUI's index i >= 0 is the output of layer i, transformers' hidden_states[i + 1])."""
    clip = load_clip(models[kind])
    tokens = clip.tokenize(PROMPT)
    for layer in (-1, -2, -3, 0, 1, 2):
        reference = _reference(hf, kind, layer if layer < 0 else layer + 1)
        clone = clip.clone()
        clone.clip_layer(layer)
        torch.testing.assert_close(clone.encode_from_tokens(tokens), reference, atol=1e-5, rtol=0)
        per_call = clip.encode_from_tokens(tokens, options={"layer": layer})
        torch.testing.assert_close(per_call, reference, atol=1e-5, rtol=0)


# --- explicit defaults ----------------------------------------------------------------

@pytest.mark.parametrize("kind, explicit", [
    ("sd1", ["--clip-skip", "1", "--clip-type", "sd1", "--syntax", "comfy", "--weight-mode", "comfy",
             "--normalization", "none"]),
    ("sd1", ["--clip-skip", "-1", "--clip-type", "auto"]),
    ("sd2", ["--clip-skip", "2", "--clip-type", "sd2", "--weight-mode", "comfy"]),
    ("sdxl", ["--clip-skip", "-2", "--syntax", "comfy"]),
])
def test_explicit_defaults_are_the_same_options(models, tmp_path, kind, explicit):
    left_out = _encode(models[kind], tmp_path / "a.safetensors")
    given = _encode(models[kind], tmp_path / "b.safetensors", *explicit)
    assert given[1] == left_out[1]
    assert given[0].keys() == left_out[0].keys()
    for name, tensor in left_out[0].items():
        assert torch.equal(given[0][name], tensor), name


# --- syntax ---------------------------------------------------------------------------

def test_syntax_a1111_reads_a1111_prompts_and_is_recorded(hf, models, tmp_path):
    """A1111: ``[word]`` is weight 1/1.1 and the default weight mode is A1111's (mean kept)."""
    prompt = "a photo of a [red] fox"
    out = tmp_path / "a.safetensors"
    assert main(["encode", prompt, "--model", str(models["sd1"]), "--syntax", "a1111", "--out", str(out)]) == 0
    with safe_open(out, "pt") as handle:
        recorded = json.loads(handle.metadata()["options"])
    assert (recorded["syntax"], recorded["weight_mode"]) == ("a1111", "a1111")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)
    ids = tokenizer("a photo of a red fox")["input_ids"]
    z = hf_run(hf["l"], ids + [END] * (77 - len(ids))).last_hidden_state[0]
    weights = torch.ones(77)
    weights[ids.index(tokenizer("red")["input_ids"][1])] = 1 / 1.1
    weighted = z * weights[:, None]
    expected = weighted * (z.mean() / weighted.mean())  # A1111: rescale to the original mean
    torch.testing.assert_close(load_file(out)["cond_0"][0], expected, atol=1e-5, rtol=1e-5)
    comfy = tmp_path / "c.safetensors"
    assert main(["encode", prompt, "--model", str(models["sd1"]), "--out", str(comfy)]) == 0
    assert not torch.equal(load_file(comfy)["cond_0"], load_file(out)["cond_0"])


def test_inspect_syntax(capsys):
    assert main(["inspect", "a [red] fox BREAK cat", "--syntax", "a1111", "--json"]) == 0
    a1111 = json.loads(capsys.readouterr().out)
    assert len(a1111["windows"]) == 2
    assert [u["weight"] for u in a1111["units"] if u["text"] == "red"] == [pytest.approx(1 / 1.1)]
    assert main(["inspect", "a [red] fox BREAK cat", "--json"]) == 0
    comfy = json.loads(capsys.readouterr().out)
    assert len(comfy["windows"]) == 1 and {u["weight"] for u in comfy["units"]} == {1.0}


def test_unknown_syntax_is_a_usage_error(capsys):
    assert main(["inspect", "a", "--syntax", "nai"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nai'" in err and err.count("\n") == 1


# --- --model: files and diffusers folders ----------------------------------------------

def _diffusers_folder(hf_model, folder: Path) -> Path:
    (folder / "tokenizer").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(Path(DEFAULT_VOCAB) / name, folder / "tokenizer" / name)
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    hf_model.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"]}))
    return folder


def test_model_accepts_a_diffusers_folder(hf, tmp_path, capsys):
    folder = _diffusers_folder(hf["l"], tmp_path / "sd15-diffusers")
    tensors, recorded = _encode(folder, tmp_path / "o.safetensors", "--clip-skip", "2")
    torch.testing.assert_close(tensors["cond_0"], _reference(hf, "sd1", -2), atol=1e-5, rtol=0)
    assert (recorded["models"], recorded["clip_type"], recorded["layer"]) == (["sd15-diffusers"], "sd1", -2)
    capsys.readouterr()
    assert main(["inspect", PROMPT, "--model", str(folder), "--json"]) == 0
    ids = [t["token"] for t in json.loads(capsys.readouterr().out)["windows"][0]]
    assert ids == _ids("l")
    assert main(["encode", "a", "--model", str(folder), "--model", str(folder),
                 "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "pass it alone" in capsys.readouterr().err


def test_inspect_model_uses_its_pad_token(models, capsys):
    assert main(["inspect", "a cat", "--model", str(models["sd2"]), "--json"]) == 0
    window = json.loads(capsys.readouterr().out)["windows"][0]
    assert [t["token"] for t in window[-2:]] == [0, 0]  # SD2 pads with "!" (id 0)


# --- help -----------------------------------------------------------------------------

def _subparsers(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


@pytest.mark.parametrize("command", ["encode", "inspect", "vision"])
def test_every_option_has_help_and_shows_its_default(command):
    parser = _subparsers(build_parser([command]))[command]
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if action.help == argparse.SUPPRESS:  # an old spelling kept as a hidden alias
            assert action.option_strings == ["--kind"] and action.dest == "clip_type"
            continue
        assert action.help, action.option_strings
        line = parser._get_formatter()._get_help_string(action)
        assert "default" in line or "(required)" in line, (action.option_strings, line)
    assert "(default: none" in text or command == "vision"


def test_help_renders_choices_as_typed_and_explains_clip_skip(capsys):
    assert main(["encode", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--syntax {comfy|a1111|compel}" in text
    assert "--weight-mode {comfy|a1111|a1111_no_norm|compel|none}" in text
    assert "1 = last layer, 2 = penultimate" in text and "ComfyUI's -1, -2, ... are accepted" in text
    assert main(["encode-dataset", "--help"]) == 0
    text = capsys.readouterr().out
    assert "{cond,pooled,pooled}" not in text


def test_weight_modes_listed_are_the_librarys():
    from textenc.text_encoders import weighting
    from textenc.commands import encode

    assert encode.WEIGHT_MODES == weighting.WEIGHT_MODES
    assert encode.NORMALIZATIONS == weighting.NORMALIZATIONS


def test_sd2_folder_of_23_layers_is_numbered_as_vit_h_24(tmp_path, capsys):
    """stabilityai's diffusers SD2 folders hold ViT-H without its last layer (23 of 24).
    ComfyUI numbers them as the 24-layer model: clip skip 2 (SD2's default) is the
    folder's last layer, and clip skip 1 (the missing layer) is an error."""
    torch.manual_seed(5)
    config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=1,
                  projection_dim=64, hidden_act="gelu", eos_token_id=END)
    full = transformers.CLIPTextModelWithProjection._from_config(transformers.CLIPTextConfig(**config)).eval()
    checkpoint = tmp_path / "sd2_24.safetensors"
    save_file({k: v.contiguous() for k, v in to_layout(hf_state(full), "sd2").items()}, str(checkpoint))
    shallow = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**{**config, "num_hidden_layers": 23})).eval()
    missing, _ = shallow.load_state_dict(full.state_dict(), strict=False)
    assert not [k for k in missing if "position_ids" not in k]
    folder = _diffusers_folder(shallow, tmp_path / "sd2-diffusers")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))
    ids = _ids("h")

    def reference(layer: int) -> torch.Tensor:
        with torch.no_grad():
            return full.text_model.final_layer_norm(hf_run(full, ids).hidden_states[layer])

    for model in (checkpoint, folder):
        for clip_skip in (None, 2, 3, 24):
            layer = -2 if clip_skip is None else -clip_skip
            options = () if clip_skip is None else ("--clip-skip", str(clip_skip))
            tensors, recorded = _encode(model, tmp_path / "o.safetensors", *options)
            assert (recorded["clip_type"], recorded["layer"]) == ("sd2", layer)
            torch.testing.assert_close(tensors["cond_0"], reference(layer), atol=1e-5, rtol=0)
    tensors, _ = _encode(checkpoint, tmp_path / "o.safetensors", "--clip-skip", "1")
    torch.testing.assert_close(tensors["cond_0"], reference(-1), atol=1e-5, rtol=0)
    capsys.readouterr()
    for clip_skip, words in (("1", "ViT-H's last layer, which this text encoder does not have: its file "
                                   "holds 23 of ViT-H's 24 layers"),
                             ("25", "out of range for a 24-layer text encoder")):
        assert main(["encode", PROMPT, "--model", str(folder), "--clip-skip", clip_skip,
                     "--out", str(tmp_path / "x.safetensors")]) == 1
        assert words in capsys.readouterr().err


def test_vision_refuses_a_folder_naming_the_file_inside(tmp_path, capsys):
    (tmp_path / "image_encoder").mkdir()
    (tmp_path / "image_encoder" / "model.safetensors").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    assert main(["vision", str(tmp_path / "a.png"), "--model", str(tmp_path / "image_encoder"),
                 "--out", str(tmp_path / "v.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "is a folder; pass the CLIP vision weight file inside it" in err
    assert str(tmp_path / "image_encoder" / "model.safetensors") in err


def test_shared_command_helpers_doctests():
    import doctest

    from textenc.commands import common

    result = doctest.testmod(common)
    assert result.attempted >= 2 and result.failed == 0


def test_sdxl_layer_range_is_the_shallower_encoders():
    """CLIP-L 2 layers, bigG 4: -3 exists in G only, so it is refused for the pair."""
    def state_dict(width, layers):
        config = transformers.CLIPTextConfig(hidden_size=width, intermediate_size=2 * width,
                                             num_hidden_layers=layers, num_attention_heads=1,
                                             projection_dim=width, eos_token_id=END)
        return transformers.CLIPTextModelWithProjection._from_config(config).state_dict()

    clip = load_clip([], clip_type="sdxl", state_dicts=[("te", state_dict(64, 2)), ("te2", state_dict(96, 4))])
    assert clip.num_layers == 2
    clip.clip_layer(-2)
    with pytest.raises(LayerError, match="layer -3 is out of range for a 2-layer text encoder"):
        clip.clip_layer(-3)
    fresh = clip.clone()
    fresh.clip_layer(None)  # a clip_layer() value takes precedence over options= (as in ComfyUI)
    with pytest.raises(LayerError, match="layer -3 is out of range for a 2-layer text encoder"):
        fresh.encode_from_tokens(fresh.tokenize("a cat"), options={"layer": -3})
