"""The text-encoder family registry: the built-in entries agree with their classes, and a
family added with one definition and one registry entry loads, tokenizes and encodes.

The toy family is one CLIP-L role under a name of its own (``"t"``); on the same weights
it must give bit for bit what the SD1 path gives, since it is SD1 by another name.
"""

from __future__ import annotations

import pytest
import torch

from test_sd1_clip import WIDTH, hf_state, make_hf, text_config
from textenc.errors import CheckpointError, PromptError
from textenc.loading.convert import TEXT_PREFIXES, to_layout
from textenc.loading.text_encoders import T5_KINDS
from textenc.prompts.tokenizer import SDTokenizer
from textenc.sd import load_clip
from textenc.text_encoders.families import Family, Role, families, get_family, register_family, unregister_family
from textenc.text_encoders.sd1_clip import SD1ClipModel, SD1Tokenizer, SDClipModel

#: The toy family: one module-level definition ...
TOY = Family("toy", "Toy", roles=(Role("t", SDClipModel, SDTokenizer, encoder="l"),),
             model_class=SD1ClipModel, tokenizer_class=SD1Tokenizer,
             comfy_default_layer=-1, diffusers_default_layer=-1)

PROMPTS = ["a (red:1.3) fox", "a cat", "(blue:0.7) sky, " * 30]


@pytest.fixture
def toy():
    """... and one registry entry, taken away again after the test."""
    register_family(TOY)
    yield TOY
    unregister_family("toy")


@pytest.fixture(scope="module")
def sd1_file():
    return [("tiny_sd1", to_layout(hf_state(make_hf("quick_gelu", 1), projection=False), "sd1"))]


def test_registry_lists_the_built_in_families_and_their_roles():
    assert [family.name for family in families()][:3] == ["sd1", "sd2", "sdxl"]
    assert {f.name: f.role_names for f in families() if f.name in ("sd1", "sd2", "sdxl")} == \
        {"sd1": ("l",), "sd2": ("h",), "sdxl": ("l", "g")}
    assert [role.attribute for role in get_family("sdxl").roles] == ["clip_l", "clip_g"]
    assert [role.diffusers_text_encoder for role in get_family("sdxl").roles] == ["text_encoder", "text_encoder_2"]
    assert get_family("sd2").role("h").released_model == ("ViT-H", 24)
    assert get_family("sd1").role("l").released_model is None
    for family in families():  # the key layouts of its full checkpoints hold its CLIP encoders
        kinds = {kind for _, kind, layout in TEXT_PREFIXES if layout in family.checkpoint_layouts}
        clip_kinds = {kind for kind in family.encoder_kinds if kind not in T5_KINDS}  # T5: found by its keys
        # SD1/SD2/SDXL exactly; Flux shares SD3's single-file layout (text_encoders.clip_l/clip_g/t5xxl)
        assert not family.checkpoint_layouts or kinds == clip_kinds or \
            (family.name == "flux" and clip_kinds < kinds), family.name


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_registry_facts_match_the_family_classes(name):
    """Each wrapper built from the entry holds its roles' classes, under the entry's attribute
    names, and defaults to the entry's ComfyUI layer (no weights needed: built on meta)."""
    family = get_family(name)
    configs = {role.name: text_config(role.activation, role.pad_token) for role in family.roles}
    model = family.model_class.for_roles(configs)
    tokenizer = family.tokenizer_class.for_roles({role: {} for role in family.role_names})
    assert list(model.encoders) == list(tokenizer.tokenizers) == list(family.role_names)
    for role in family.roles:
        encoder = model.encoders[role.name]
        assert type(encoder) is role.model_class and getattr(model, role.attribute) is encoder
        assert type(tokenizer.tokenizers[role.name]) is role.tokenizer_class
        assert tokenizer.tokenizers[role.name].pad_token == role.pad_token
        options = encoder.options
        layer = -1 if options.layer == "last" else options.layer_idx
        assert layer == family.comfy_default_layer


def test_a_toy_family_loads_tokenizes_and_encodes_as_sd1(toy, sd1_file):
    ours = load_clip(None, clip_type="toy", state_dicts=sd1_file)
    sd1 = load_clip(None, state_dicts=sd1_file)  # auto-detection still finds SD1 first
    assert (ours.clip_type, sd1.clip_type) == ("toy", "sd1") and ours.family is toy
    assert list(ours.cond_stage_model.encoders) == ["t"] and hasattr(ours.cond_stage_model, "clip_t")
    assert "clip_t.transformer.text_model.final_layer_norm.weight" in ours.get_sd()
    for prompt in PROMPTS:
        tokens = ours.tokenize(prompt)
        assert list(tokens) == ["t"] and tokens["t"] == sd1.tokenize(prompt)["l"]
        cond, pooled = ours.encode_from_tokens(tokens, return_pooled=True)
        ref_cond, ref_pooled = sd1.encode_from_tokens(sd1.tokenize(prompt), return_pooled=True)
        assert torch.equal(cond, ref_cond) and torch.equal(pooled, ref_pooled)
    assert cond.shape[0] == 1 and cond.shape[1] > 77 and cond.shape[2] == WIDTH  # the long prompt: windows


def test_a_toy_family_encodes_in_a_batch_as_each_alone(toy, sd1_file):
    clip = load_clip(None, clip_type="toy", state_dicts=sd1_file)
    tokens = [clip.tokenize(prompt) for prompt in PROMPTS + PROMPTS[:1]]
    batch = clip.encode_batch(tokens, options={"layer": -2})
    for one, (cond, pooled) in zip(tokens, batch):
        ref_cond, ref_pooled = clip.encode_from_tokens(one, return_pooled=True, options={"layer": -2})
        assert torch.equal(cond, ref_cond) and torch.equal(pooled, ref_pooled)
    assert torch.equal(clip.empty_window(), clip.encode_from_tokens(clip.tokenize(""))[0])


def test_batched_encode_returns_or_raises_a_bad_prompts_error(sd1_file):
    clip = load_clip(None, state_dicts=sd1_file)
    good = clip.tokenize("a cat")
    bad = {"l": [[(token, float("nan")) for token, _ in good["l"][0]]]}
    first, error = clip.encode_batch([good, bad], errors="return")
    assert torch.equal(first.cond, clip.encode_from_tokens(good)) and isinstance(error, PromptError)
    with pytest.raises(PromptError, match="finite"):
        clip.encode_batch([good, bad])


def test_unregistering_removes_the_family(sd1_file):
    register_family(TOY)
    with pytest.raises(ValueError, match="registered already"):
        register_family(TOY)
    unregister_family("toy")
    assert "toy" not in [family.name for family in families()]
    with pytest.raises(CheckpointError, match="'toy' is not one of"):
        get_family("toy")
    with pytest.raises(CheckpointError, match="'toy' is not one of"):
        load_clip(None, clip_type="toy", state_dicts=sd1_file)


def test_detection_names_every_family_when_none_fits(sd1_file):
    from textenc.sd import detect_clip_type

    assert detect_clip_type(["l", "g"]) == "sdxl"
    with pytest.raises(CheckpointError, match=r"expected L \(SD1\), H \(SD2\), L\+G \(SDXL\), L\+G\+T5 \(SD3\), L\+T5 \(Flux\) or UMT5 \(Wan\)"):
        detect_clip_type(["g"])


def test_registry_docstring_examples_run():
    import doctest

    from textenc.text_encoders import families as families_module, registry

    for module in (registry, families_module):
        assert doctest.testmod(module).failed == 0, module.__name__
