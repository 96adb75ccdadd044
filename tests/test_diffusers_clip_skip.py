"""``encode_for_pipeline(clip_skip=k)`` picks the layer ``pipe(clip_skip=k)`` picks; ``layer=`` is ComfyUI's.

The oracle is diffusers' own ``encode_prompt`` (and one denoising run through
``pipe(...)``) on tiny random SD1, SD2 and SDXL pipelines, plus an SD2 pipeline
whose text encoder has 23 layers: a 24-layer one with its last layer dropped,
as stabilityai's diffusers SD2 folders ship OpenCLIP ViT-H.

diffusers 0.42's SD1/SD2 ``clip_skip`` path reads
``text_encoder.text_model.final_layer_norm``, which transformers 5 no longer has
(``CLIPTextModel`` is flat); :func:`_text_model_alias` lends it that attribute
for the call, pointing at the same ``final_layer_norm`` module (the lookup
``tests/test_diffusers.py`` uses).
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from test_diffusers import (NEGATIVE, SHORT, _build_pipeline, _hidden_normed, _reference,  # noqa: E402
                            _run, _text_encoder)
from textenc.diffusers import encode_for_pipeline, load_from_diffusers  # noqa: E402
from textenc.errors import LayerError, PromptError  # noqa: E402

ATOL = 1e-5


@contextlib.contextmanager
def _text_model_alias(pipe):
    encoder = pipe.text_encoder
    if hasattr(encoder, "text_model"):
        yield
        return
    norm = dict(encoder.named_modules())["final_layer_norm"]
    object.__setattr__(encoder, "text_model", types.SimpleNamespace(final_layer_norm=norm))
    try:
        yield
    finally:
        object.__delattr__(encoder, "text_model")


def _vit_h_pair():
    """(24-layer SD2 text encoder, the same without its last layer)."""
    full = _text_encoder(40, 5, "gelu", seed=5, layers=24)
    cut = _text_encoder(40, 5, "gelu", seed=6, layers=23)
    state = {k: v for k, v in full.state_dict().items() if ".layers.23." not in k}
    cut.load_state_dict(state, strict=True)
    return full, cut


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict:
    out = {kind: _build_pipeline(kind) for kind in ("sd1", "sd2", "sdxl")}
    full, cut = _vit_h_pair()
    out["sd2_24"] = _build_pipeline("sd2", text_encoder=full)
    out["sd2_23"] = _build_pipeline("sd2", text_encoder=cut)
    folder = tmp_path_factory.mktemp("sd2_23")
    out["sd2_23"].save_pretrained(folder)
    out["sd2_23_folder"] = folder
    for pipe in out.values():
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
    return out


def _diffusers_positive(pipe, clip_skip):
    with _text_model_alias(pipe):
        reference = _reference(pipe, SHORT, NEGATIVE, clip_skip=clip_skip)
    return {name: value for name, value in reference.items() if not name.startswith("negative")}


def _positive_close(ours: dict, reference: dict) -> None:
    for name, value in reference.items():
        assert ours[name].shape == value.shape, name
        assert float((ours[name] - value).abs().max()) <= ATOL, name


# (kind, deepest clip_skip): 3-layer tiny encoders; SDXL counts from the penultimate layer.
MATRIX = [("sd1", 2), ("sd2", 2), ("sdxl", 1), ("sd2_23", 22)]


@pytest.mark.parametrize("kind,deepest", MATRIX)
def test_clip_skip_matches_diffusers_encode_prompt(pipes, kind, deepest):
    pipe = pipes[kind]
    for clip_skip in sorted({0, 1, deepest}):
        ours = encode_for_pipeline(pipe, SHORT, NEGATIVE, clip_skip=clip_skip)
        _positive_close(ours, _diffusers_positive(pipe, clip_skip))
        # textenc applies clip_skip to the negative too (diffusers keeps its default there).
        alone = encode_for_pipeline(pipe, NEGATIVE, clip_skip=clip_skip)
        assert torch.equal(ours["negative_prompt_embeds"], alone["prompt_embeds"])


@pytest.mark.parametrize("kind,deepest", MATRIX)
def test_clip_skip_outside_the_depth_names_value_and_range(pipes, kind, deepest):
    with pytest.raises(LayerError, match=rf"clip_skip {deepest + 1} is out of range .*up to {deepest}\)"):
        encode_for_pipeline(pipes[kind], SHORT, clip_skip=deepest + 1)
    with pytest.raises(LayerError, match="layer=-1"):
        encode_for_pipeline(pipes[kind], SHORT, clip_skip=-1)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_pipe_call_with_clip_skip_gives_the_same_latents(pipes, kind):
    """End to end: ``pipe(prompt, clip_skip=1)`` against ``pipe(**encode_for_pipeline(..., clip_skip=1))``.

    guidance_scale=1 skips classifier-free guidance, so no negative is involved.
    """
    pipe = pipes[kind]
    with _text_model_alias(pipe):
        expected = _run(pipe, prompt=SHORT, clip_skip=1, guidance_scale=1.0)
    kwargs = encode_for_pipeline(pipe, SHORT, clip_skip=1)
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("negative")}
    ours = _run(pipe, **kwargs, guidance_scale=1.0)
    assert float((ours - expected).abs().max()) <= 1e-4


def test_layer_is_comfy_numbering(pipes):
    for kind in ("sd1", "sd2"):
        pipe = pipes[kind]
        for layer in (-1, -2, -3, 0, 1, 2):
            index = layer if layer < 0 else layer - 3
            ours = encode_for_pipeline(pipe, SHORT, layer=layer)["prompt_embeds"]
            assert float((ours - _hidden_normed(pipe, SHORT, index)).abs().max()) <= ATOL, (kind, layer)
        with pytest.raises(LayerError, match=r"layer -4 is out of range .* -3\.\.-1 .* 0\.\.2"):
            encode_for_pipeline(pipe, SHORT, layer=-4)
        with pytest.raises(LayerError, match="layer 3 is out of range"):
            encode_for_pipeline(pipe, SHORT, layer=3)


def test_sd2_with_23_layers_counts_vit_h_layers(pipes):
    full, cut, folder = pipes["sd2_24"], pipes["sd2_23"], pipes["sd2_23_folder"]
    # ComfyUI's SD2 default is ViT-H's penultimate layer: the 23-layer encoder's last.
    penultimate = _hidden_normed(full, SHORT, -2)
    from_folder = load_from_diffusers(folder)
    for source in (cut, from_folder):
        for kwargs in ({}, {"layer": -2}):
            ours = encode_for_pipeline(source, SHORT, **kwargs)["prompt_embeds"]
            assert float((ours - penultimate).abs().max()) <= ATOL, kwargs
    ours = encode_for_pipeline(cut, SHORT, layer=-3)["prompt_embeds"]
    assert float((ours - _hidden_normed(full, SHORT, -3)).abs().max()) <= ATOL
    ours = encode_for_pipeline(cut, SHORT, layer=22)["prompt_embeds"]
    assert float((ours - penultimate).abs().max()) <= ATOL
    # The library default of the loaded CLIP, outside encode_for_pipeline, too.
    cond = from_folder.encode_from_tokens(from_folder.tokenize(SHORT))
    assert float((cond - penultimate).abs().max()) <= ATOL
    with pytest.raises(LayerError, match=r"layer -1 is ViT-H's last layer.*23 of ViT-H's 24 layers.*-24\.\.-2"):
        encode_for_pipeline(cut, SHORT, layer=-1)
    with pytest.raises(LayerError, match="layer 23 is ViT-H's last layer"):
        encode_for_pipeline(cut, SHORT, layer=23)


# ---- prompt syntax ----------------------------------------------------------------

def test_syntax_a1111_reads_a1111_prompts(pipes):
    pipe = pipes["sd1"]
    # A1111: [x] divides the weight by 1.1; its weight mode is the syntax's default.
    a1111 = encode_for_pipeline(pipe, "a [cat] on a (mat:1.3)", syntax="a1111")
    same = encode_for_pipeline(pipe, "a (cat:0.9090909090909091) on a (mat:1.3)", weight_mode="a1111")
    assert torch.equal(a1111["prompt_embeds"], same["prompt_embeds"])
    comfy_weights = encode_for_pipeline(pipe, "a [cat] on a (mat:1.3)", syntax="a1111", weight_mode="comfy")
    assert not torch.equal(a1111["prompt_embeds"], comfy_weights["prompt_embeds"])
    # BREAK starts a new 77-token window.
    broken = encode_for_pipeline(pipe, "a cat BREAK on a mat", syntax="a1111")["prompt_embeds"]
    assert broken.shape[1] == 154
    assert torch.equal(broken[:, :77], encode_for_pipeline(pipe, "a cat", syntax="a1111")["prompt_embeds"])
    as_word = encode_for_pipeline(pipe, "a cat BREAK on a mat")["prompt_embeds"]  # comfy: a word
    assert as_word.shape[1] == 77


def test_syntax_errors(pipes):
    with pytest.raises(PromptError, match="choose one of comfy, a1111"):
        encode_for_pipeline(pipes["sd1"], SHORT, syntax="A1111")
