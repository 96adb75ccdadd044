"""diffusers' 23-layer SD2 text encoder is numbered as ViT-H's 24 layers at every entry point.

ComfyUI loads stabilityai's diffusers SD2 ``text_encoder`` (OpenCLIP ViT-H without
its last layer) into its 24-layer model, so ``CLIPSetLastLayer(-2)`` (SD2's default)
encodes ViT-H's layer 22 of 24: the file's last layer. The oracle is transformers:
a 24-layer random ``CLIPTextModelWithProjection`` and the same weights without layer
23; ComfyUI's layer 22 of 24 is ``hidden_states[-2]`` of the first and
``hidden_states[-1]`` of the second, final-layer-normed as SD2 does. Every entry
point is checked against it: ``clip_layer``, per-call ``options``,
``set_clip_options``, ``textenc encode --clip-skip``, ``encode_dataset``,
``encode_for_pipeline`` and the ``CLIPSetLastLayer`` node; ``-1`` (the layer the
file lacks) raises ``LayerError`` everywhere. Also here: a per-call ``"layer"``
wins over ``clip_layer()`` (docs/python-api.md, "ComfyUI's names").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from random_weights import randomize_
from test_nodes import run
from test_sd1_clip import END, START, hf_run, hf_state
from textenc.cli import main
from textenc.loading.convert import to_layout
from textenc.dataset import encode_dataset, open_shards
from textenc.diffusers import encode_for_pipeline
from textenc.errors import LayerError
from textenc.sd import load_clip
from textenc.prompts.tokenizer import DEFAULT_VOCAB

transformers = pytest.importorskip("transformers")

PROMPT = "a photo of a red fox"
ATOL = 1e-5
MISSING = r"23 of ViT-H's 24 layers"


def _hf(layers: int) -> torch.nn.Module:
    """A tiny ViT-H-like text model (one head: a checkpoint read from shapes has width / 64 heads)."""
    config = transformers.CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=1,
        projection_dim=64, hidden_act="gelu", eos_token_id=END, bos_token_id=START)
    return transformers.CLIPTextModelWithProjection._from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def vit_h() -> dict:
    """The 24-layer oracle, the 23-layer one holding the same weights, and the SD2 file of the latter."""
    full = _hf(24)
    randomize_(full, 7)
    short = _hf(23)
    missing, unexpected = short.load_state_dict(
        {k: v for k, v in full.state_dict().items() if ".layers.23." not in k}, strict=False)
    assert not [k for k in missing if "position_ids" not in k] and not unexpected
    return {"full": full, "short": short}


@pytest.fixture(scope="module")
def sd2_23(vit_h, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sd2_23") / "sd2_23.safetensors"
    save_file({k: v.contiguous() for k, v in to_layout(hf_state(vit_h["short"]), "sd2").items()}, str(path))
    return path


def _ids() -> list[int]:
    ids = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)(PROMPT)["input_ids"]
    return ids + [0] * (77 - len(ids))  # SD2 pads with "!" (id 0)


def _comfy_layer(vit_h, layer: int) -> torch.Tensor:
    """transformers' hidden state at ComfyUI's negative ``layer`` of 24, final-layer-normed."""
    with torch.no_grad():
        full = vit_h["full"].text_model.final_layer_norm(hf_run(vit_h["full"], _ids()).hidden_states[layer])
        # the 23-layer model's own hidden states: ComfyUI's -2 is its last (hidden_states[-1])
        short = vit_h["short"].text_model.final_layer_norm(hf_run(vit_h["short"], _ids()).hidden_states[layer + 1])
    torch.testing.assert_close(short, full, atol=ATOL, rtol=0)
    return short


def _close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape[-2:] == reference.shape[-2:]
    assert float((ours.reshape(reference.shape) - reference).abs().max()) <= ATOL


def test_the_file_loads_as_23_layers_numbered_as_24(sd2_23):
    clip = load_clip(str(sd2_23))
    encoder = clip.cond_stage_model.encoder
    assert (clip.clip_type, encoder.num_layers, encoder.numbered_layers) == ("sd2", 23, 24)
    assert (clip.num_layers, clip.numbered_layers) == (23, 24)
    assert (encoder.layer, encoder.layer_idx) == ("hidden", -2)  # ComfyUI's SD2 default, as ComfyUI holds it


def test_clip_layer_and_options_use_comfyui_numbering(vit_h, sd2_23):
    clip = load_clip(str(sd2_23))
    tokens = clip.tokenize(PROMPT)
    penultimate, third = _comfy_layer(vit_h, -2), _comfy_layer(vit_h, -3)
    _close(clip.encode_from_tokens(tokens), penultimate)  # the default
    for layer, reference in ((-2, penultimate), (22, penultimate), (-3, third), (21, third)):
        skipped = clip.clone()
        skipped.clip_layer(layer)
        _close(skipped.encode_from_tokens(tokens), reference)
        _close(clip.encode_from_tokens(tokens, options={"layer": layer}), reference)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True, options={"layer": -2})
    with torch.no_grad():
        text_embeds = vit_h["short"](torch.tensor([_ids()])).text_embeds
    _close(pooled, text_embeds)  # pooled: the file's last layer, projected (diffusers' SD2)
    for layer in (-1, 23):
        with pytest.raises(LayerError, match=rf"layer {layer} is ViT-H's last layer.*{MISSING}.*-24\.\.-2"):
            clip.clone().clip_layer(layer)
        with pytest.raises(LayerError, match=MISSING):
            clip.encode_from_tokens(tokens, options={"layer": layer})
    with pytest.raises(LayerError, match=r"layer -25 is out of range for a 24-layer"):
        clip.clone().clip_layer(-25)


def test_set_clip_options_on_the_model_uses_comfyui_numbering(vit_h, sd2_23):
    clip = load_clip(str(sd2_23))
    model = clip.cond_stage_model
    tokens = clip.tokenize(PROMPT)
    model.set_clip_options({"layer": -3})
    try:
        assert model.encoder.layer_idx == -3
        _close(model.encode_token_weights(tokens)[0], _comfy_layer(vit_h, -3))
        model.set_clip_options({"layer": -2})
        _close(model.encode_token_weights(tokens)[0], _comfy_layer(vit_h, -2))
        with pytest.raises(LayerError, match=MISSING):
            model.set_clip_options({"layer": -1})
    finally:
        model.reset_clip_options()
    _close(model.encode_token_weights(tokens)[0], _comfy_layer(vit_h, -2))


def test_per_call_layer_wins_over_clip_layer(vit_h, sd2_23):
    clip = load_clip(str(sd2_23))
    clip.clip_layer(-3)
    tokens = clip.tokenize(PROMPT)
    _close(clip.encode_from_tokens(tokens), _comfy_layer(vit_h, -3))
    _close(clip.encode_from_tokens(tokens, options={"layer": -2}), _comfy_layer(vit_h, -2))
    _close(clip.encode_from_tokens(tokens, options={"layer": -4}), _comfy_layer(vit_h, -4))
    (entry,) = clip.encode_scheduled(PROMPT, steps=4, options={"layer": -2})
    _close(entry[0], _comfy_layer(vit_h, -2))
    assert clip.layer_idx == -3  # the per-call value does not stick
    _close(clip.encode_from_tokens(tokens), _comfy_layer(vit_h, -3))
    # ComfyUI's order (encode_from_tokens): reset_clip_options(), clip_layer()'s layer, then
    # the call's own set_clip_options; {"layer": None} there means the last layer (the file's).
    _close(clip.encode_from_tokens(tokens, options={"layer": None}), _comfy_layer(vit_h, -2))
    # clip_layer() wins over options set on the model before the call (ComfyUI resets those, then
    # applies clip_layer()).
    clip.cond_stage_model.set_clip_options({"layer": -4})
    try:
        _close(clip.encode_from_tokens(tokens), _comfy_layer(vit_h, -3))
    finally:
        clip.cond_stage_model.reset_clip_options()
    clip.clip_layer(None)  # back to the model's default
    _close(clip.encode_from_tokens(tokens, options={"layer": -3}), _comfy_layer(vit_h, -3))
    _close(clip.encode_from_tokens(tokens), _comfy_layer(vit_h, -2))
    # Without clip_layer(), options set on the model are reset too (ComfyUI's first step), and
    # stay reset afterwards: the default layer, then the model's own call sees the default.
    clip.cond_stage_model.set_clip_options({"layer": -4})
    _close(clip.encode_from_tokens(tokens), _comfy_layer(vit_h, -2))
    _close(clip.cond_stage_model.encode_token_weights(tokens)[0], _comfy_layer(vit_h, -2))


def _cli(model: Path, out: Path, *options: str) -> tuple[dict, dict]:
    assert main(["encode", PROMPT, "--model", str(model), "--out", str(out), *options]) == 0
    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
    return load_file(out), json.loads(metadata["options"])


def test_cli_clip_skip_uses_comfyui_numbering(vit_h, sd2_23, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    for options, layer in (((), -2), (("--clip-skip", "2"), -2), (("--clip-skip", "-2"), -2),
                           (("--clip-skip", "3"), -3), (("--clip-skip", "-3"), -3)):
        tensors, recorded = _cli(sd2_23, out, *options)
        assert recorded["layer"] == layer, options
        _close(tensors["cond_0"], _comfy_layer(vit_h, layer))
    capsys.readouterr()
    for clip_skip in ("1", "-1"):
        assert main(["encode", PROMPT, "--model", str(sd2_23), "--clip-skip", clip_skip,
                     "--out", str(tmp_path / "x.safetensors")]) == 1
        assert "23 of ViT-H's 24 layers" in capsys.readouterr().err


def test_dataset_clip_skip_uses_comfyui_numbering(vit_h, sd2_23, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text(PROMPT + "\n", encoding="utf-8")
    for clip_skip, layer in ((None, -2), (2, -2), (-2, -2), (3, -3)):
        out = tmp_path / f"out_{clip_skip}"
        encode_dataset(captions, model=sd2_23, out=out, clip_skip=clip_skip, dtype="fp32", progress=False)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["options"]["layer"] == {"h": layer}, clip_skip
        ((row, cond, _),) = list(open_shards(out))
        _close(cond, _comfy_layer(vit_h, layer))
    with pytest.raises(LayerError, match=MISSING):
        encode_dataset(captions, model=sd2_23, out=tmp_path / "bad", clip_skip=1, progress=False)


def test_encode_for_pipeline_layer_and_clip_skip(vit_h, sd2_23):
    clip = load_clip(str(sd2_23))
    for kwargs, layer in (({}, -2), ({"layer": -2}, -2), ({"layer": -3}, -3),
                          ({"clip_skip": 0}, -2), ({"clip_skip": 1}, -3)):
        _close(encode_for_pipeline(clip, PROMPT, **kwargs)["prompt_embeds"], _comfy_layer(vit_h, layer))
    skipped = clip.clone()
    skipped.clip_layer(-3)
    _close(encode_for_pipeline(skipped, PROMPT)["prompt_embeds"], _comfy_layer(vit_h, -3))
    _close(encode_for_pipeline(skipped, PROMPT, layer=-2)["prompt_embeds"], _comfy_layer(vit_h, -2))
    with pytest.raises(LayerError, match=MISSING):
        encode_for_pipeline(clip, PROMPT, layer=-1)


def test_clip_set_last_layer_node_uses_comfyui_numbering(vit_h, sd2_23, pack):
    clip = load_clip(str(sd2_23))
    for layer in (-2, -3):
        (skipped,) = run(pack, "CLIPSetLastLayer", clip=clip, stop_at_clip_layer=layer)
        (conditioning,) = run(pack, "CLIPTextEncode", clip=skipped, text=PROMPT)
        _close(conditioning[0][0], _comfy_layer(vit_h, layer))
    with pytest.raises(LayerError, match=rf"stop_at_clip_layer=-1: .*{MISSING}"):
        run(pack, "CLIPSetLastLayer", clip=clip, stop_at_clip_layer=-1)


def test_layer_numbering_doctests():
    import doctest

    from textenc.text_encoders import clip_skip as layers

    result = doctest.testmod(layers)
    assert result.attempted >= 6 and result.failed == 0
