"""SD3, Flux and Wan through the node pack (issue 26 point 2): the loaders take ComfyUI's types
and files (fp16, fp8 scaled, GGUF; models/text_encoders and models/clip), the encode nodes give
what the library gives for the same tokens, and the graph rules are ComfyUI's, read from its
code (comfy_extras/nodes_sd3.py ``CLIPTextEncodeSD3``, nodes_flux.py ``CLIPTextEncodeFlux`` /
``FluxGuidance``, node_helpers.conditioning_set_values, sd1_clip.ClipTokenWeightEncoder):

* CLIPTextEncodeFlux: tokens = tokenize(clip_l), then ``t5xxl`` replaced by tokenize(t5xxl)["t5xxl"];
  the conditioning's extras are ``{"pooled_output", "guidance"}``;
* FluxGuidance: every entry's extras copied with ``guidance`` replaced; tensors shared;
* CLIPTextEncodeSD3: with ``empty_padding="none"`` an empty prompt's part has no tokens; then
  the shorter of l / g gets empty-prompt windows; both CLIP parts empty skip CLIP (pooled zeros
  (1, 2048)); an empty T5 part encodes ``</s>`` alone (one row).

The transformers models of tests/family_fixtures.py are the oracles where the rule reaches the
numbers (token ids from transformers' / tokenizers' own tokenizers).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from family_fixtures import TinyFamily, weights
from t5_fixtures import save_safetensors, scaled_fp8
from test_nodes import run
from textenc.errors import CheckpointError, PromptError
from textenc.loading import paths
from textenc.prompts.vocabulary import DEFAULT_VOCAB
from textenc.sd import load_clip
from textenc.text_encoders.t5 import T5_VOCAB

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

FP8_NAME = "t5xxl_fp8_e4m3fn_scaled.safetensors"
GGUF_NAME = "t5-v1_1-xxl-encoder-Q8_0.gguf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyFamily:
    root = tmp_path_factory.mktemp("models")
    folder = root / "text_encoders"
    folder.mkdir()
    family = TinyFamily(folder)
    file, _ = scaled_fp8(weights(family.t5))
    save_safetensors(folder / FP8_NAME, file)
    from t5_fixtures import write_gguf
    write_gguf(folder / GGUF_NAME, weights(family.t5), gguf.GGMLQuantizationType.Q8_0)
    (root / "clip").mkdir()  # ComfyUI's old folder name, still read
    shutil.copy(family.paths["l"], root / "clip" / "clip_l_old_folder.safetensors")
    (root / "embeddings").mkdir()
    (root / "checkpoints").mkdir()  # the single-file SD3-style checkpoint (text_encoders.* + a model key)
    shutil.copy(family.paths["sd3"], root / "checkpoints" / family.paths["sd3"].name)
    family.root = root
    return family


@pytest.fixture()
def models_dir(tiny, monkeypatch) -> Path:
    monkeypatch.setattr(paths, "_explicit_dir", str(tiny.root))
    return tiny.root


def name(tiny, key: str) -> str:
    return tiny.paths[key].name


# --- oracles ------------------------------------------------------------------------

def clip_ids(text: str, pad: int) -> list[int]:
    tokenizer = transformers.CLIPTokenizer(str(Path(DEFAULT_VOCAB) / "vocab.json"),
                                           str(Path(DEFAULT_VOCAB) / "merges.txt"))
    ids = [49406] + tokenizer(text, add_special_tokens=False)["input_ids"] + [49407]
    return ids + [pad] * (77 - len(ids))


def t5_ids(text: str, min_length: int) -> list[int]:
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(Path(T5_VOCAB) / "tokenizer.json")).encode(text).ids  # ends with </s>
    return ids + [0] * (min_length - len(ids))


@torch.no_grad()
def t5_out(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).last_hidden_state  # unmasked, as SD3 and Flux run it


@torch.no_grad()
def clip_out(model, ids: list[int]):
    """transformers' hidden states, pooled output (unprojected) and ``text_embeds`` (projected)."""
    out = model.text_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    out.text_embeds = model.text_projection(out.pooler_output)
    return out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# --- loaders --------------------------------------------------------------------------

def test_file_lists_hold_gguf_and_the_old_clip_folder(pack, models_dir, tiny):  # noqa: F811
    listed = pack.NODE_CLASS_MAPPINGS["CLIPLoader"].INPUT_TYPES()["required"]["clip_name"][0]
    assert {GGUF_NAME, FP8_NAME, "clip_l_old_folder.safetensors",
            name(tiny, "umt5")} <= set(listed)


@pytest.mark.parametrize("t5_file", ["t5", FP8_NAME, GGUF_NAME])
def test_flux_dual_loader_and_encode_equal_the_library(pack, models_dir, tiny, t5_file):  # noqa: F811
    t5_name = name(tiny, "t5") if t5_file == "t5" else t5_file
    (clip,) = run(pack, "DualCLIPLoader", clip_name1=t5_name, clip_name2=name(tiny, "l"), type="flux",
                  device="cpu")
    library = load_clip([tiny.root / "text_encoders" / t5_name, tiny.paths["l"]], clip_type="flux")
    assert (clip.clip_type, library.clip_type) == ("flux", "flux")
    (conditioning,) = run(pack, "CLIPTextEncodeFlux", clip=clip, clip_l="a photo of a cat",
                          t5xxl="a (red:1.2) fox", guidance=2.5)
    tokens = library.tokenize("a photo of a cat")
    tokens["t5xxl"] = library.tokenize("a (red:1.2) fox")["t5xxl"]
    cond, pooled = library.encode_from_tokens(tokens, return_pooled=True)
    [[got_cond, extras]] = conditioning
    assert set(extras) == {"pooled_output", "guidance"} and extras["guidance"] == 2.5
    assert torch.equal(got_cond, cond) and torch.equal(extras["pooled_output"], pooled)


def test_flux_graph_semantics_against_transformers(pack, models_dir, tiny):  # noqa: F811
    """cond is T5's (length max(256, tokens), unmasked) of the t5xxl text only; pooled is
    CLIP-L's unprojected pooled output of the clip_l text only."""
    (clip,) = run(pack, "DualCLIPLoader", clip_name1=name(tiny, "l"), clip_name2=name(tiny, "t5"), type="flux")
    (conditioning,) = run(pack, "CLIPTextEncodeFlux", clip=clip, clip_l="a red fox", t5xxl="a photo of a cat",
                          guidance=3.5)
    [[cond, extras]] = conditioning
    assert close(cond, t5_out(tiny.t5, t5_ids("a photo of a cat", 256)))
    assert close(extras["pooled_output"], clip_out(tiny.clip_l, clip_ids("a red fox", 49407)).pooler_output)
    (guided,) = run(pack, "FluxGuidance", conditioning=conditioning, guidance=7.0)
    assert guided[0][1]["guidance"] == 7.0 and extras["guidance"] == 3.5  # replaced in a copy
    assert guided[0][0] is cond and guided[0][1]["pooled_output"] is extras["pooled_output"]


def _sd3(pack, tiny):  # noqa: F811
    # Three files, T5 first: the T5 file is told by its keys, as ComfyUI's TripleCLIPLoader
    # (always SD3). CLIP-L and CLIP-G are told apart by width (768 / 1280); the tiny ones
    # (64 / 128) are not, so they come in the recipe's order, L before G.
    (clip,) = run(pack, "TripleCLIPLoader", clip_name1=name(tiny, "t5"), clip_name2=name(tiny, "l"),
                  clip_name3=name(tiny, "g"))
    return clip


def test_sd3_triple_loader_and_encode_against_transformers(pack, models_dir, tiny):  # noqa: F811
    clip = _sd3(pack, tiny)
    assert clip.clip_type == "sd3"
    text = "a photo of a cat"
    (conditioning,) = run(pack, "CLIPTextEncodeSD3", clip=clip, clip_l=text, clip_g=text, t5xxl=text,
                          empty_padding="none")
    [[cond, extras]] = conditioning
    l_out, g_out = clip_out(tiny.clip_l, clip_ids(text, 49407)), clip_out(tiny.clip_g, clip_ids(text, 0))
    clip_part = torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2]], dim=-1)  # penultimate, no norm
    clip_part = torch.nn.functional.pad(clip_part, (0, 192 - clip_part.shape[-1]))
    assert close(cond, torch.cat([clip_part, t5_out(tiny.t5, t5_ids(text, 77))], dim=1))
    assert close(extras["pooled_output"], torch.cat([l_out.pooler_output, g_out.text_embeds], dim=-1))
    library = load_clip([tiny.paths["l"], tiny.paths["g"], tiny.paths["t5"]], clip_type="sd3")
    assert torch.equal(cond, library.encode_from_tokens(library.tokenize(text)))


def test_sd3_empty_padding_rules(pack, models_dir, tiny):  # noqa: F811
    clip = _sd3(pack, tiny)

    def encode(clip_l: str, clip_g: str, t5xxl: str, padding: str):
        (conditioning,) = run(pack, "CLIPTextEncodeSD3", clip=clip, clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl,
                              empty_padding=padding)
        return conditioning[0][0], conditioning[0][1]["pooled_output"]

    # Only T5 text, "none": CLIP is skipped (pooled zeros of ComfyUI's width 768 + 1280).
    cond, pooled = encode("", "", "a cat", "none")
    assert close(cond, t5_out(tiny.t5, t5_ids("a cat", 77)))
    assert torch.equal(pooled, torch.zeros(1, 2048))
    # Empty T5 text, "none": T5 encodes "</s>" alone, one row after the 77 CLIP rows.
    cond, _ = encode("a cat", "a cat", "", "none")
    assert cond.shape[1] == 77 + 1 and close(cond[:, -1:], t5_out(tiny.t5, [1]))
    # "empty_prompt": the empty T5 prompt, [1, 0, ...] of 77 tokens.
    cond, _ = encode("a cat", "a cat", "", "empty_prompt")
    assert cond.shape[1] == 77 + 77 and close(cond[:, 77:], t5_out(tiny.t5, [1] + [0] * 76))
    # clip_g empty, "none": g is padded with the empty prompt's window to l's length.
    cond, _ = encode("a cat", "", "a cat", "none")
    expected = clip.encode_from_tokens({**clip.tokenize("a cat"), "g": clip.tokenize("")["g"]})
    assert torch.equal(cond, expected)
    # A clip_l longer than one window: g gets empty windows until both have two.
    long_text = "a photo of a cat, " * 20
    cond, _ = encode(long_text, "a dog", "x", "none")
    tokens = {"l": clip.tokenize(long_text)["l"], "g": clip.tokenize("a dog")["g"] + clip.tokenize("")["g"],
              "t5xxl": clip.tokenize("x")["t5xxl"]}
    assert len(tokens["l"]) == 2 and torch.equal(cond, clip.encode_from_tokens(tokens))


def test_single_file_loaders(pack, models_dir, tiny):  # noqa: F811
    """CLIPLoader: sd3 from a T5 file alone (fp8 scaled or GGUF), wan from UMT5, sd1 from the clip folder."""
    for t5_name in (FP8_NAME, GGUF_NAME):
        (clip,) = run(pack, "CLIPLoader", clip_name=t5_name, type="sd3")
        library = load_clip([tiny.root / "text_encoders" / t5_name], clip_type="sd3")
        (conditioning,) = run(pack, "CLIPTextEncode", clip=clip, text="a (red:1.3) fox")
        assert torch.equal(conditioning[0][0], library.encode_from_tokens(library.tokenize("a (red:1.3) fox")))
    (wan,) = run(pack, "CLIPLoader", clip_name=name(tiny, "umt5"), type="wan")
    (conditioning,) = run(pack, "CLIPTextEncode", clip=wan, text="a cat")
    library = load_clip([tiny.paths["umt5"]], clip_type="wan")
    assert torch.equal(conditioning[0][0], library.encode_from_tokens(library.tokenize("a cat")))
    assert conditioning[0][0].shape[1] == 512 and conditioning[0][1]["pooled_output"] is None
    (old,) = run(pack, "CLIPLoader", clip_name="clip_l_old_folder.safetensors", type="stable_diffusion")
    assert old.clip_type == "sd1"
    (single,) = run(pack, "CheckpointCLIPLoaderTextenc", ckpt_name=name(tiny, "sd3"))
    library = load_clip([tiny.paths["sd3"]])
    assert single.clip_type == library.clip_type == "sd3"
    (conditioning,) = run(pack, "CLIPTextEncode", clip=single, text="a cat")
    assert torch.equal(conditioning[0][0], library.encode_from_tokens(library.tokenize("a cat")))


def test_bad_combinations_are_one_line_typed_errors(pack, models_dir, tiny):  # noqa: F811
    cases = [
        (CheckpointError, "CLIPLoader", dict(clip_name=name(tiny, "umt5"), type="flux"), "UMT5"),
        (CheckpointError, "CLIPLoader", dict(clip_name=name(tiny, "t5"), type="wan"), "T5"),
        (CheckpointError, "DualCLIPLoader", dict(clip_name1=name(tiny, "t5"), clip_name2=name(tiny, "umt5"),
                                                 type="flux"), "Flux"),
        (CheckpointError, "CLIPLoader", dict(clip_name=name(tiny, "umt5_bare"), type="wan"), "spiece_model"),
    ]
    for error, node_name, inputs, words in cases:
        with pytest.raises(error, match=words) as caught:
            run(pack, node_name, **inputs)
        assert "\n" not in str(caught.value)
    (flux,) = run(pack, "DualCLIPLoader", clip_name1=name(tiny, "l"), clip_name2=name(tiny, "t5"), type="flux")
    with pytest.raises(CheckpointError, match=r"CLIPTextEncodeSD3: clip must have the text encoders l \+ g \+ t5xxl"
                                              r", got a Flux CLIP \(l \+ t5xxl\)"):
        run(pack, "CLIPTextEncodeSD3", clip=flux, clip_l="a", clip_g="b", t5xxl="c", empty_padding="none")
    with pytest.raises(CheckpointError, match="CLIPTextEncodeFlux: clip must have the text encoders l \\+ t5xxl"):
        run(pack, "CLIPTextEncodeFlux", clip=_sd3(pack, tiny), clip_l="a", t5xxl="b", guidance=3.5)
    with pytest.raises(CheckpointError, match="CLIPTextEncodeSDXL: clip must have the text encoders l \\+ g"):
        run(pack, "CLIPTextEncodeSDXL", clip=flux, width=1, height=1, crop_w=0, crop_h=0, target_width=1,
            target_height=1, text_g="a", text_l="b")
    with pytest.raises(PromptError, match="empty_padding"):
        run(pack, "CLIPTextEncodeSD3", clip=flux, clip_l="a", clip_g="b", t5xxl="c", empty_padding="zeros")
