"""Prompt syntaxes on the T5 families (issue 26 point 6): ``comfy`` everywhere; ``a1111`` and
``compel`` only where that project defines the reading. ``a1111`` reads SD3 as A1111's webui
does and Flux as Forge does, through the family tokenizers
(``tests/test_a1111_families.py``); compel defines T5 for Flux only (``CompelForFlux``, compel
2.5.1 ``convenience_wrappers.py``; built and tested against compel in ``test_flux_compel.py``).
A T5 tokenizer on its own and Wan's UMT5 refuse both, SD3 refuses compel. A refusal is a
``PromptError`` naming the syntax that applies, never an encode some other way."""

import pytest

from textenc.errors import PromptError
from textenc.text_encoders.flux import FluxTokenizer
from textenc.text_encoders.sd3_clip import SD3Tokenizer
from textenc.text_encoders.t5 import T5XXLTokenizer, UMT5XXlTokenizer

from family_fixtures import spiece_bytes


def _tokenizers():
    umt5 = {"tokenizer": spiece_bytes()}
    return {"t5": T5XXLTokenizer(), "umt5": UMT5XXlTokenizer(**umt5), "flux": FluxTokenizer(),
            "sd3": SD3Tokenizer()}


@pytest.mark.parametrize("syntax, name", [("a1111", "t5"), ("a1111", "umt5"), ("compel", "t5"), ("compel", "umt5"),
                                          ("compel", "sd3")])
def test_other_syntaxes_are_refused_on_t5_parts(name, syntax):
    tokenizer = _tokenizers()[name]
    with pytest.raises(PromptError, match=rf"syntax='{syntax}' is not defined for .*"
                                          r"the syntaxes that apply: 'comfy'"):
        tokenizer.tokenize_with_weights("a (red:1.2) fox", syntax=syntax)
    if hasattr(tokenizer, "inspect"):
        with pytest.raises(PromptError, match="the syntaxes that apply: 'comfy'"):
            tokenizer.inspect("a (red:1.2) fox", syntax=syntax)


def test_wan_names_why():
    with pytest.raises(PromptError, match=r"UMT5 \(Wan\): neither A1111 nor Forge nor compel"):
        _tokenizers()["umt5"].tokenize_with_weights("a cat", syntax="a1111")


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_a1111_reads_sd3_and_flux_as_a_whole(name):
    tokens = _tokenizers()[name].tokenize_with_weights("a (red:1.2) fox", syntax="a1111")
    assert tokens["t5xxl"] and tokens["l"]


def test_flux_reads_compel_in_compels_t5_chunk():
    tokenizer = FluxTokenizer()
    tokens = tokenizer.tokenize_with_weights("a (red)1.2 fox", syntax="compel")
    assert len(tokens["t5xxl"]) == 1 and len(tokens["t5xxl"][0]) == 512
    assert tokenizer.t5xxl.inspect("a (red)1.2 fox", syntax="compel").windows


@pytest.mark.parametrize("name", ["t5", "umt5", "flux", "sd3"])
def test_comfy_syntax_is_the_default_reading(name):
    tokenizer = _tokenizers()[name]
    assert tokenizer.tokenize_with_weights("a (red:1.2) fox", syntax="comfy") == \
        tokenizer.tokenize_with_weights("a (red:1.2) fox")


def test_clip_parts_keep_every_syntax():
    """The refusal belongs to the T5 tokenizer: a CLIP tokenizer still reads a1111 and compel."""
    clip_l = FluxTokenizer().clip_l
    for syntax in ("a1111", "compel"):
        assert clip_l.tokenize_with_weights("a (red:1.2) fox", syntax=syntax)
