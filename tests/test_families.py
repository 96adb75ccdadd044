"""SD3 / SD3.5, Flux and Wan through ``load_clip`` + ``tokenize`` + ``encode_from_tokens``: tokens,
weights, cond and pooled against ComfyUI's rules restated over transformers' models
(:mod:`family_reference`), fp32 within 1e-5 relative, on tiny random files in the real key
layouts (:mod:`family_fixtures`)."""

from __future__ import annotations

import pytest
import torch

import family_reference as ref
from family_fixtures import TinyFamily
from textenc.sd import load_clip
from textenc.text_encoders.sd3_clip import SD3ClipModel

transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

PROMPTS = ["a photo of a cat", "a (red:1.3) cat on a (mat:0.7), (\\(photo\\))", "", "((big dog)) </s> typed",
           "(long:1.2) " + "word " * 90]
#: The encodes (each a forward of ours and of transformers'): weighted + escapes, empty, two windows.
ENCODED = [PROMPTS[1], PROMPTS[2], PROMPTS[4]]


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    error = float((got - want).abs().max())
    assert error <= rtol * max(float(want.abs().max()), 1e-30), f"max|Δ| {error:.3g}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyFamily:
    return TinyFamily(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module")
def sd3(tiny):
    return load_clip([tiny.paths["l"], tiny.paths["g"], tiny.paths["t5"]], clip_type="sd3")


@pytest.fixture(scope="module")
def flux(tiny):
    return load_clip([tiny.paths["t5"], tiny.paths["l"]], clip_type="flux")


@pytest.fixture(scope="module")
def wan(tiny):
    return load_clip([tiny.paths["umt5"]], clip_type="wan")


@pytest.fixture(scope="module")
def comfy_tokens(tiny):
    l, g, t5 = ref.clip_tokenizer(pad_with_end=True), ref.clip_tokenizer(pad_with_end=False), ref.hf_t5_encode()
    processor = sentencepiece.SentencePieceProcessor(model_proto=tiny.spiece)
    umt5 = lambda text: processor.encode(text, add_eos=True)  # noqa: E731
    return {"sd3": lambda text: {"l": l.tokenize_with_weights(text), "g": g.tokenize_with_weights(text),
                                 "t5xxl": ref.t5_tokens(text, t5, 77)},
            "flux": lambda text: {"l": l.tokenize_with_weights(text), "t5xxl": ref.t5_tokens(text, t5, 256)},
            "wan": lambda text: {"umt5xxl": ref.t5_tokens(text, umt5, 512)}}


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_tokens_are_comfyui_s(family, prompt, comfy_tokens, request):
    clip = request.getfixturevalue(family)
    got = clip.tokenize(prompt)
    want = comfy_tokens[family](prompt)
    assert list(got) == list(want) if family != "sd3" else sorted(got) == sorted(want)
    for role in want:
        assert [[t for t, _ in w] for w in got[role]] == [[t for t, _ in w] for w in want[role]], role
        assert [w for x in got[role] for _, w in x] == pytest.approx([w for x in want[role] for _, w in x])


def test_typed_end_token_ends_t5_but_is_text_for_wan(sd3, wan):
    t5 = [t for t, _ in sd3.tokenize("a </s> b")["t5xxl"][0]]
    assert t5.index(1) < t5.index(0) - 1  # the typed </s> is id 1, before the prompt's own end
    umt5 = [t for t, _ in wan.tokenize("a </s> b")["umt5xxl"][0]]
    assert umt5.count(1) == 1 and umt5.index(1) == umt5.index(0) - 1


@pytest.mark.parametrize("prompt", ENCODED)
def test_sd3_cond_and_pooled(prompt, sd3, tiny, comfy_tokens):
    tokens = comfy_tokens["sd3"](prompt)
    cond, pooled = sd3.encode_from_tokens(sd3.tokenize(prompt), return_pooled=True)
    want_cond, want_pooled = ref.sd3(tokens, clip_l=tiny.clip_l, clip_g=tiny.clip_g, t5=tiny.t5, width=192)
    assert_close(cond, want_cond)
    assert_close(pooled, want_pooled)
    assert cond.shape[1] == 77 * len(tokens["l"]) + len(tokens["t5xxl"][0])


@pytest.mark.parametrize("prompt", ENCODED)
def test_flux_cond_and_pooled(prompt, flux, tiny, comfy_tokens):
    tokens = comfy_tokens["flux"](prompt)
    cond, pooled = flux.encode_from_tokens(flux.tokenize(prompt), return_pooled=True)
    want_cond, want_pooled = ref.flux(tokens, clip_l=tiny.clip_l, t5=tiny.t5)
    assert_close(cond, want_cond)
    assert_close(pooled, want_pooled)
    assert cond.shape[1] == max(256, len(tokens["t5xxl"][0]))


@pytest.mark.parametrize("prompt", ENCODED)
def test_wan_cond_masked_and_zeroed(prompt, wan, tiny, comfy_tokens):
    tokens = comfy_tokens["wan"](prompt)
    cond, pooled = wan.encode_from_tokens(wan.tokenize(prompt), return_pooled=True)
    assert pooled is None
    assert_close(cond, ref.wan(tokens, umt5=tiny.umt5))
    end = [t for t, _ in tokens["umt5xxl"][0]].index(1)
    assert cond[0, end + 1:].eq(0).all() and cond.shape[1] == 512


def test_single_file_sd3_checkpoint_is_detected_and_equal(tiny, sd3):
    single = load_clip(tiny.paths["sd3"])
    assert single.clip_type == "sd3" and list(single.cond_stage_model.encoders) == ["l", "g", "t5xxl"]
    tokens = single.tokenize(PROMPTS[1])
    for a, b in zip(single.encode_from_tokens(tokens, return_pooled=True), sd3.encode_from_tokens(tokens,
                                                                                                 return_pooled=True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("parts", [("l",), ("g",), ("l", "g"), ("t5",), ("l", "t5")])
def test_sd3_any_subset_missing_parts_are_zeros(parts, tiny, comfy_tokens):
    clip = load_clip([tiny.paths["g_named" if p == "g" else p] for p in parts], clip_type="sd3")
    assert list(clip.cond_stage_model.encoders) == [{"t5": "t5xxl"}.get(p, p) for p in parts]
    prompt = PROMPTS[1]
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    models = {"clip_l": tiny.clip_l if "l" in parts else None, "clip_g": tiny.clip_g if "g" in parts else None,
              "t5": tiny.t5 if "t5" in parts else None}
    want_cond, want_pooled = ref.sd3(comfy_tokens["sd3"](prompt), **models, width=192 if "t5" in parts else 4096)
    assert_close(cond, want_cond)
    assert_close(pooled, want_pooled)


def test_sd3_nothing_loaded_is_zeros(sd3):
    cond, pooled, extra = SD3ClipModel(clip_l=False, clip_g=False, t5=False).encode_token_weights(
        sd3.tokenize("a cat"))
    assert torch.equal(cond, torch.zeros(1, 77, 4096)) and torch.equal(pooled, torch.zeros(1, 2048)) and extra == {}


def test_return_dict_and_encode(sd3, flux, wan):
    tokens = sd3.tokenize("a cat")
    result = sd3.encode_from_tokens(tokens, return_dict=True)
    assert set(result) == {"cond", "pooled_output"} and result["pooled_output"].shape == (1, 64 + 128)
    assert torch.equal(sd3.encode("a cat"), result["cond"])
    assert flux.encode_from_tokens(flux.tokenize("a cat"), return_dict=True)["pooled_output"].shape == (1, 64)
    assert wan.encode_from_tokens(wan.tokenize("a cat"), return_dict=True)["pooled_output"] is None


@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_encode_batch_equals_each_alone(family, request):
    clip = request.getfixturevalue(family)
    tokens = [clip.tokenize(p) for p in ENCODED]
    for (cond, pooled), prompt in zip(clip.encode_batch(tokens), tokens):
        alone = clip.encode_from_tokens(prompt, return_pooled=True)
        assert torch.equal(cond, alone[0])
        assert (pooled is None and alone[1] is None) or torch.equal(pooled, alone[1])
    empty = clip.empty_window()
    assert torch.equal(empty, clip.encode_from_tokens(clip.tokenize(""))[0])


def test_clip_set_last_layer_reaches_every_part(sd3, flux, tiny, comfy_tokens):
    """CLIPSetLastLayer as ComfyUI applies it: SD3 -1 puts L and G at their last layer without the
    final norm and T5 at its last (normed) output; Flux -2 moves T5 to block -2 with the final
    norm, and L's pooled (always from the last layer) stays."""
    prompt = PROMPTS[1]
    clip = sd3.clone()
    clip.clip_layer(-1)
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    tokens = comfy_tokens["sd3"](prompt)
    l_out, l_pooled = ref.clip_part(tiny.clip_l, tokens["l"], pad=49407, layer=-1, projected=False)
    g_out, g_pooled = ref.clip_part(tiny.clip_g, tokens["g"], pad=0, layer=-1, projected=True)
    t5_out = ref.t5_part(tiny.t5, tokens["t5xxl"], masked=False)
    assert_close(cond, torch.cat([torch.cat([l_out, g_out], -1), t5_out], 1))
    assert_close(pooled, torch.cat([l_pooled, g_pooled], -1))
    clip = flux.clone()
    clip.clip_layer(-2)
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    tokens = comfy_tokens["flux"](prompt)
    assert_close(cond, ref.t5_part(tiny.t5, tokens["t5xxl"], masked=False, layer=-2))
    assert_close(pooled, ref.flux(tokens, clip_l=tiny.clip_l, t5=tiny.t5)[1])


def test_textual_inversion_reaches_the_clip_parts(tiny, tmp_path):
    """An embedding file's ``clip_l`` / ``clip_g`` vectors go to SD3's CLIP parts, as SDXL's."""
    from safetensors.torch import save_file
    vectors = {"clip_l": torch.randn(2, 64), "clip_g": torch.randn(2, 128)}
    (tmp_path / "emb").mkdir()
    save_file(vectors, str(tmp_path / "emb" / "style.safetensors"))
    clip = load_clip([tiny.paths["l"], tiny.paths["g"], tiny.paths["t5"]], clip_type="sd3",
                     embedding_directory=str(tmp_path / "emb"))
    from textenc.errors import EmbeddingWarning
    tokens = clip.tokenize("embedding:style cat")
    for role in ("l", "g"):
        rows = [t for t, _ in tokens[role][0] if isinstance(t, torch.Tensor)]
        assert len(rows) == 2 and all(torch.equal(r, v) for r, v in zip(rows, vectors[f"clip_{role}"])), role
    # No t5xxl entry: T5 takes the file's first tensor whatever its width, as ComfyUI's load_embed,
    # and drops it at encode (tests/test_t5_embedding_width.py).
    rows = [t for t, _ in tokens["t5xxl"][0] if isinstance(t, torch.Tensor)]
    assert len(rows) == 2 and torch.equal(rows[0], vectors["clip_g"][0])
    with pytest.warns(EmbeddingWarning, match="wrong width"):
        cond = clip.encode_from_tokens(tokens)
    assert torch.isfinite(cond).all() and not torch.equal(cond, clip.encode_from_tokens(clip.tokenize("cat")))


def test_clip_wider_than_t5_is_an_encode_error(tiny, sd3):
    """ComfyUI would crop G's 768-column left padding (no L) to a narrower T5 by negative
    padding; textenc refuses (no released set is like this)."""
    from textenc.errors import EncodeError
    clip = load_clip([tiny.paths["g_named"], tiny.paths["t5"]], clip_type="sd3")
    with pytest.raises(EncodeError, match="do not fit T5's width 192"):
        clip.encode_from_tokens(clip.tokenize("a cat"))


def test_a_layer_one_part_lacks_is_a_layer_error(sd3):
    from textenc.errors import LayerError
    clip = sd3.clone()
    with pytest.raises(LayerError):
        clip.clip_layer(-4)  # the tiny CLIP parts have 3 layers (ComfyUI would use their last)


def test_registry_entries_match_the_wrappers(sd3, flux, wan):
    """Each loaded wrapper holds its roles' encoders under the entry's attribute names and
    classes; the T5 roles carry the family's minimum length and diffusers' component names."""
    from textenc.text_encoders.families import get_family
    for clip in (sd3, flux, wan):
        family = clip.family
        assert list(clip.cond_stage_model.encoders) == list(family.role_names)
        assert list(clip.tokenizer.tokenizers) == list(family.role_names)
        for role in family.roles:
            encoder = clip.cond_stage_model.encoders[role.name]
            assert getattr(clip.cond_stage_model, role.attribute) is encoder and type(encoder) is role.model_class
            assert isinstance(clip.tokenizer.tokenizers[role.name], role.tokenizer_class)
            if role.is_t5:
                assert clip.tokenizer.tokenizers[role.name].min_length == role.min_length
    assert [r.min_length for r in get_family("sd3").roles] == [None, None, 77]
    assert [r.diffusers_text_encoder for r in get_family("sd3").roles] == ["text_encoder", "text_encoder_2",
                                                                           "text_encoder_3"]
    assert [r.diffusers_text_encoder for r in get_family("flux").roles] == ["text_encoder", "text_encoder_2"]
    assert get_family("wan").role("umt5xxl").min_length == 512 and not get_family("wan").diffusers_pooled
    assert get_family("sd3").partial and not get_family("flux").partial
