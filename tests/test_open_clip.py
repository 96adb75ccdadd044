r"""Parity with open_clip itself: its own forward is the oracle for textenc's loaders.

Tiny random open_clip models (no downloads) are saved in the real file layouts
(SD2 ``cond_stage_model.model.*``, SDXL ``conditioner.embedders.1.model.*``,
open_clip ``visual.*`` and the other vision-tower homes), loaded through
textenc's public loaders, and compared with open_clip's ``encode_text`` /
``encode_image`` and per-token hidden states, to 1e-5 in fp32.

Every parameter is redrawn at random, LayerNorms and biases included, so a
swapped or untransposed key cannot hide behind an identity initialisation.

open_clip needs torchvision, so CI (torch CPU only) skips this file. To run it::

    python3 -m venv /work/venv-oc
    /work/venv-oc/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/venv-oc/bin/pip install open_clip_torch transformers safetensors numpy \
        pytest hypothesis tokenizers
    /work/venv-oc/bin/pip install -e . --no-deps
    /work/venv-oc/bin/python -m pytest tests/test_open_clip.py tests/test_convert.py -q

Last run: torch 2.14.1, torchvision 0.29.1, open_clip_torch 3.3.0 (CPU, fp32):
text hidden states bit-identical, projected pooled within 7.2e-07 (SD2, SDXL L
and G); vision image_embeds within 4.8e-07, last hidden state within 1.4e-06.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

open_clip = pytest.importorskip(
    "open_clip",
    reason="open_clip needs torchvision; not installed in CI (see tests/test_open_clip.py's "
           "docstring for the venv and the run where it was)",
)
from safetensors.torch import save_file  # noqa: E402

from textenc.loading.checkpoint import load_state_dict  # noqa: E402
from textenc.vision.clip_vision import ClipVisionModel, find_vision_tower  # noqa: E402
from textenc.loading.convert import to_layout  # noqa: E402
from textenc.loading.detect import convert_text_state_dict, convert_vision_state_dict, detect_vision
from textenc.sd import load_clip  # noqa: E402
from textenc.text_encoders.sd2_clip import SD2Tokenizer  # noqa: E402

#: fp32 parity bound of the style guide (STYLE.md, "Tests").
TOLERANCE = 1e-5
TEXT_WIDTH, TEXT_LAYERS, CONTEXT, VOCAB = 128, 2, 77, 49408
VISION_WIDTH, VISION_LAYERS, PATCH, IMAGE = 64, 2, 14, 56
EMBED_DIM = 96  # the shared projection width, unlike either tower's width
SHORT_PROMPT = "a photo of a red fox, 4k"
# Long enough for two 77-token windows (textenc splits, open_clip would truncate).
LONG_PROMPT = " ".join(["a watercolor painting of a lighthouse on a cliff at dusk"] * 9)


def _open_clip_model(*, quick_gelu: bool, text_heads: int = 2, vision_head_width: int = 32,
                     seed: int) -> Any:
    """A tiny random ``open_clip.model.CLIP`` in eval mode, every parameter redrawn."""
    model = open_clip.model.CLIP(
        embed_dim=EMBED_DIM,
        vision_cfg={"width": VISION_WIDTH, "layers": VISION_LAYERS, "head_width": vision_head_width,
                    "patch_size": PATCH, "image_size": IMAGE},
        text_cfg={"width": TEXT_WIDTH, "heads": text_heads, "layers": TEXT_LAYERS,
                  "context_length": CONTEXT, "vocab_size": VOCAB},
        quick_gelu=quick_gelu,
    ).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            # Matrices at unit output scale (std 1/sqrt(fan-in)); vectors (LayerNorm
            # weights and biases, linear biases, class token) far from 1 and 0.
            std = parameter[0].numel() ** -0.5 if parameter.ndim >= 2 else 0.5
            torch.nn.init.normal_(parameter, std=std, generator=generator)
    return model


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({key: value.detach().clone().contiguous() for key, value in state.items()}, str(path))
    return path


def _text_weights(model: Any, prefix: str) -> dict[str, torch.Tensor]:
    """The text tower as SD2 / SDXL files hold it: no ``visual.*``, ``logit_scale`` kept."""
    return {prefix + key: value for key, value in model.state_dict().items()
            if not key.startswith("visual.")}


class OpenClipText(NamedTuple):
    last: torch.Tensor  # (B, T, D): ln_final(transformer(x))
    penultimate: torch.Tensor  # (B, T, D): output of block -2, no final layer norm
    projected_pooled: torch.Tensor  # (B, P): encode_text


@torch.no_grad()
def _open_clip_text(model: Any, tokens: torch.Tensor) -> OpenClipText:
    """open_clip's own text forward, with the block outputs kept."""
    x = model.token_embedding(tokens) + model.positional_embedding
    # open_clip 3.x runs the stack batch first (transformer.batch_first); older releases
    # took (T, B, D) and had no such attribute.
    batch_first = getattr(model.transformer, "batch_first", False)
    h = x if batch_first else x.transpose(0, 1)
    outputs = []
    for block in model.transformer.resblocks:
        h = block(h, attn_mask=model.attn_mask)
        outputs.append(h if batch_first else h.transpose(0, 1))
    whole = model.transformer(x if batch_first else x.transpose(0, 1), attn_mask=model.attn_mask)
    whole = whole if batch_first else whole.transpose(0, 1)
    # The per-block loop is exactly open_clip's own transformer forward.
    torch.testing.assert_close(outputs[-1], whole, rtol=0, atol=0)
    return OpenClipText(model.ln_final(whole), outputs[-2], model.encode_text(tokens))


def _max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return (got.float() - want.float()).abs().max().item()


def _window_ids(windows: list) -> torch.Tensor:
    """textenc token windows ``[[(id, weight), ...], ...]`` -> ids (W, T)."""
    return torch.tensor([[int(pair[0]) for pair in window] for window in windows])


def _by_window(x: torch.Tensor) -> torch.Tensor:
    """textenc's cond (1, W*T, D) -> (W, T, D), as open_clip sees the windows."""
    return x.reshape(-1, CONTEXT, x.shape[-1])


# -- tokenizer ---------------------------------------------------------------------------------


def test_token_ids_match_open_clip_tokenizer() -> None:
    clip_tokens = open_clip.tokenize([SHORT_PROMPT])[0]  # the package's bundled BPE vocabulary
    windows = SD2Tokenizer(embedding_size=TEXT_WIDTH).tokenize_with_weights(SHORT_PROMPT)["h"]
    assert torch.equal(_window_ids(windows)[0], clip_tokens)


# -- SD2: ViT-H text tower at cond_stage_model.model.* ------------------------------------------


@pytest.mark.parametrize("text_heads", [2, 4], ids=["head_dim_64", "head_dim_32"])
@pytest.mark.parametrize("prompt", [SHORT_PROMPT, LONG_PROMPT], ids=["one_window", "two_windows"])
def test_sd2_text_matches_open_clip(tmp_path: Path, text_heads: int, prompt: str) -> None:
    model = _open_clip_model(quick_gelu=False, text_heads=text_heads, seed=20)
    path = _save(tmp_path / "sd2.safetensors", _text_weights(model, "cond_stage_model.model."))
    # Shapes give the head count only for 64-wide heads; otherwise say it.
    configs = {} if text_heads == 2 else {"h": {
        "vocab_size": VOCAB, "hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH,
        "num_hidden_layers": TEXT_LAYERS, "num_attention_heads": text_heads,
        "max_position_embeddings": CONTEXT, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "projection_dim": EMBED_DIM, "bos_token_id": 49406, "eos_token_id": 49407,
        "pad_token_id": 0}}
    clip = load_clip(path, text_configs=configs)
    assert clip.clip_type == "sd2"
    tokens = clip.tokenize(prompt)
    want = _open_clip_text(model, _window_ids(tokens["h"]))

    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    ln_final = model.ln_final
    with torch.no_grad():  # SD2 default: penultimate layer, then the final layer norm
        assert _max_diff(_by_window(cond), ln_final(want.penultimate)) <= TOLERANCE
    assert _max_diff(pooled, want.projected_pooled[:1]) <= TOLERANCE
    last = clip.encode_from_tokens(tokens, options={"layer": None})
    assert _max_diff(_by_window(last), want.last) <= TOLERANCE


# -- SDXL: CLIP-L (quick_gelu, HF layout) + bigG (gelu) at conditioner.embedders.1.model.* -------


def _sdxl_file(tmp_path: Path, clip_l: Any, clip_g: Any) -> Path:
    # SDXL's L is transformers' CLIPTextModel: HF names and no text_projection.
    l_hf = convert_text_state_dict(_text_weights(clip_l, "")).state_dict
    l_hf.pop("text_projection.weight")
    state = to_layout(l_hf, "sdxl_l") | _text_weights(clip_g, "conditioner.embedders.1.model.")
    return _save(tmp_path / "sdxl.safetensors", state)


@pytest.mark.parametrize("prompt", [SHORT_PROMPT, LONG_PROMPT], ids=["one_window", "two_windows"])
def test_sdxl_text_matches_open_clip(tmp_path: Path, prompt: str) -> None:
    clip_l = _open_clip_model(quick_gelu=True, seed=30)
    clip_g = _open_clip_model(quick_gelu=False, seed=31)
    clip = load_clip(_sdxl_file(tmp_path, clip_l, clip_g))
    assert clip.clip_type == "sdxl"
    tokens = clip.tokenize(prompt)
    want_l = _open_clip_text(clip_l, _window_ids(tokens["l"]))
    want_g = _open_clip_text(clip_g, _window_ids(tokens["g"]))

    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    cond = _by_window(cond)  # SDXL default: penultimate layers, no final layer norm
    assert _max_diff(cond[..., :TEXT_WIDTH], want_l.penultimate) <= TOLERANCE
    assert _max_diff(cond[..., TEXT_WIDTH:], want_g.penultimate) <= TOLERANCE
    assert _max_diff(pooled, want_g.projected_pooled[:1]) <= TOLERANCE
    last = _by_window(clip.encode_from_tokens(tokens, options={"layer": None}))
    assert _max_diff(last[..., :TEXT_WIDTH], want_l.last) <= TOLERANCE
    assert _max_diff(last[..., TEXT_WIDTH:], want_g.last) <= TOLERANCE


# -- vision towers in every open_clip home ------------------------------------------------------

VISION_HOMES = {
    "open_clip": "visual.",  # a whole open_clip checkpoint, text tower included
    "bare": "",  # model.visual.state_dict() on its own
    "sd21_unclip": "embedder.model.visual.",
    "svd": "conditioner.embedders.0.open_clip.model.visual.",
}


def _vision_file(tmp_path: Path, model: Any, home: str) -> Path:
    if home == "open_clip":
        state = model.state_dict()
    else:
        prefix = VISION_HOMES[home]
        state = {prefix + key: value for key, value in model.visual.state_dict().items()}
    return _save(tmp_path / f"{home}.safetensors", state)


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
@pytest.mark.parametrize("home", sorted(VISION_HOMES))
def test_vision_matches_open_clip(tmp_path: Path, home: str, quick_gelu: bool) -> None:
    model = _open_clip_model(quick_gelu=quick_gelu, seed=40)
    state = load_state_dict(_vision_file(tmp_path, model, home))
    assert find_vision_tower(state) == (VISION_HOMES[home], "open_clip")
    converted = convert_vision_state_dict(state)
    assert converted.unmatched == ()
    info = detect_vision(state)
    vision = ClipVisionModel({
        "hidden_size": info.hidden_size, "intermediate_size": info.intermediate_size,
        "num_hidden_layers": info.num_layers, "image_size": info.image_size,
        "patch_size": info.patch_size, "projection_dim": info.projection_dim,
        # Not in the weights: head count (64 / head_width 32) and activation.
        "num_attention_heads": VISION_WIDTH // 32,
        "hidden_act": "quick_gelu" if quick_gelu else "gelu", "layer_norm_eps": 1e-5})
    vision.load_sd(converted.state_dict)

    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(41))
    with torch.no_grad():  # normalised pixels straight in: no resize / crop / mean-std
        got = vision.model(pixels, intermediate_output=-2)
        # _embeds: conv1, class token, positions and ln_pre (open_clip 3.x's split of forward).
        tokens = model.visual.transformer(model.visual._embeds(pixels))
        want = model.encode_image(pixels)
    assert _max_diff(got.image_embeds, want) <= TOLERANCE
    assert _max_diff(got.last_hidden_state, tokens) <= TOLERANCE
