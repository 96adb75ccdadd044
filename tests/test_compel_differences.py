"""One test per bullet of the "Differences from compel" list in docs/prompts.md.

Each test runs the real compel (2.5.1, the test-only oracle) on the input the bullet
names and asserts compel's behaviour as it is (its output, its parser's exception,
the text it drops, the exception it crashes with), next to textenc's on the same
input. compel is driven as a user would: ``Compel(...)(prompt)`` with its own
parser built per call (not the memoized one the other oracle modules patch in).
The models are the tiny random ones of ``test_compel_oracle.py`` (SD1) and
``test_compel_sdxl.py`` (SDXL, compel's multi-encoder setup).
"""

from __future__ import annotations

import pytest
import torch

compel = pytest.importorskip("compel")
pytest.importorskip("transformers")

import pyparsing  # noqa: E402
from compel.cross_attention_control import Arguments as CrossAttentionArguments  # noqa: E402
from compel.prompt_parser import CrossAttentionControlSubstitute, LoraWeight  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_compel_oracle import COMPEL, WIDTH, assert_close, pipe, textenc_cond  # noqa: E402,F401  (pipe: fixture)
from test_compel_sdxl import max_error, sdxl, textenc_encode  # noqa: E402,F401  (sdxl: fixture)
from textenc.errors import PromptError  # noqa: E402
from textenc.prompts.tokenizer import SDTokenizer  # noqa: E402


def textenc_refuses(pipe, prompt: str, match: str) -> None:
    with pytest.raises(PromptError, match=match):
        pipe["textenc_tokenizer"].tokenize_with_weights(prompt, syntax="compel")


# ---- .swap() and withLora()/useLora(): compel hands them to the caller -------------------

@pytest.mark.parametrize("prompt, text, match", [
    ("a cat.swap(dog)", "a cat", r"\.swap"),
    ("mountain man withLora(hairy, 0.5)", "mountain man", "LoRA"),
    ("useLora(x) a cat", "a cat", "LoRA"),
])
def test_swap_and_lora_compel_hands_to_the_caller_textenc_refuses(pipe, prompt, text, match):
    """compel encodes the prompt without them and returns them apart: a ``.swap()`` as
    the ``cross_attention_control`` option of its conjunction's conditioning, a LoRA
    as the conjunction's ``lora_weights``. textenc has nothing to apply them with."""
    theirs = pipe["compel"]
    conjunction = theirs.parse_prompt_string(prompt)
    if ".swap" in prompt:
        assert any(isinstance(f, CrossAttentionControlSubstitute) for f in conjunction.prompts[0].children)
        _, _, options = theirs.build_conditioning_tensor_for_conjunction(conjunction, return_tokenization=True)
        assert isinstance(options["cross_attention_control"], CrossAttentionArguments)
    else:
        assert conjunction.lora_weights and all(isinstance(w, LoraWeight) for w in conjunction.lora_weights)
    with torch.no_grad():
        assert torch.equal(theirs(prompt), theirs(text))  # the conditioning is the text without them
    textenc_refuses(pipe, prompt, match)


# ---- a normalized .blend() whose weights sum to 0 ----------------------------------------

@pytest.mark.parametrize("prompt", ['("mountain, man", "face, eyes--").blend(1,-1)',
                                    '("a", "b").blend(0.5, -0.5)', '("a", "a").blend(1, -1)',
                                    '("a", "b").blend(0, 0)'])
def test_blend_weights_summing_to_0_compel_returns_nan_textenc_refuses(pipe, prompt):
    """compel divides by the sum: every value is NaN or ±inf (NaN where the members'
    terms share a sign, ±inf where they do not); none is finite."""
    with torch.no_grad():
        theirs = pipe["compel"](prompt)
    assert theirs.shape == (1, 77, WIDTH)
    assert theirs.isnan().any() and not theirs.isfinite().any()
    textenc_refuses(pipe, prompt, "sum to 0")


def test_blend_weights_summing_to_0_without_normalizing_are_compels_numbers(pipe):
    prompt = '("a", "b").blend(1, -1, no_normalize)'
    with torch.no_grad():
        theirs = pipe["compel"](prompt)
    assert theirs.isfinite().all()
    assert_close(textenc_cond(pipe, prompt), theirs, prompt)


# ---- text after .blend(...) ----------------------------------------------------------------

@pytest.mark.parametrize("prompt", ['("a", "b").blend(0.5, 0.5) trailing', '("fire", "flames").blend(0.7, 0.3) (x)0.5',
                                    '("a", "b").blend(), more', '("a", "b").blend(1, 1) c.and()'])
def test_text_after_blend_compels_parser_fails_textenc_refuses(pipe, prompt):
    with pytest.raises(pyparsing.ParseException, match="Expected end of text"), torch.no_grad():
        pipe["compel"](prompt)
    textenc_refuses(pipe, prompt, r"after \.blend")


# ---- text after .and(...) -----------------------------------------------------------------

@pytest.mark.parametrize("prompt, kept", [
    ('("a", "b").and() ignored by compel', '("a", "b").and()'),
    ('("fire", "flames").and(1, 0.5) tail (x)0.5', '("fire", "flames").and(1, 0.5)'),
    ('("a (cat)0.5 sits", "on a mat").and(), (rug)0 end', '("a (cat)0.5 sits", "on a mat").and()'),
])
def test_text_after_and_is_dropped_as_compel_drops_it(pipe, prompt, kept):
    theirs = pipe["compel"]
    assert theirs.parse_prompt_string(prompt) == theirs.parse_prompt_string(kept)
    with torch.no_grad():
        cond = theirs(prompt)
        assert torch.equal(cond, theirs(kept))
    tokenizer = pipe["textenc_tokenizer"]
    assert (tokenizer.tokenize_with_weights(prompt, syntax="compel")
            == tokenizer.tokenize_with_weights(kept, syntax="compel"))
    assert_close(textenc_cond(pipe, prompt), cond, prompt)


# ---- where compel crashes, textenc encodes what is left -------------------------------------

@pytest.mark.parametrize("prompt, crash, same_as", [
    ('("")0.5 cat', TypeError, "cat"),  # compel: None + int, a masked fragment without tokens
    ('a ("")-- cat', TypeError, "a cat"),
    ("()", IndexError, ""),  # compel's parse has no prompt at all
])
def test_where_compel_crashes_textenc_encodes_the_text_left(pipe, prompt, crash, same_as):
    """A down-weighted fragment with no tokens is ignored; a prompt with no fragment is
    the empty prompt."""
    with pytest.raises(crash), torch.no_grad():
        pipe["compel"](prompt)
    with torch.no_grad():
        assert_close(textenc_cond(pipe, prompt), pipe["compel"](same_as), prompt)


# ---- compel's SDXL setups: requires_pooled and multiple encoders ----------------------------

WEIGHTED_AND = ['("fire", "flames").and(2,1)', '("a (cat)0.5 sits", "on a (mat)0").add(1, 0.7)']


@pytest.mark.parametrize("prompt", WEIGHTED_AND)
def test_weighted_and_crashes_compel_with_requires_pooled(pipe, prompt):
    """SD1 ``Compel(..., requires_pooled=True)``: AttributeError (its ``build_conditioning_tensor('')``
    returns a tuple there); textenc gives its cond without ``requires_pooled`` and its
    ``get_pooled_embeddings([text])``."""
    pooled_compel = compel.Compel(tokenizer=pipe["tokenizer"], text_encoder=pipe["text_encoder"],
                                  requires_pooled=True)
    with pytest.raises(AttributeError, match="'tuple' object has no attribute 'shape'"), torch.no_grad():
        pooled_compel(prompt)
    tokens = pipe["textenc_tokenizer"].tokenize_with_weights(prompt, syntax="compel")
    cond, pooled = pipe["model"].encode_token_weights(tokens, options=COMPEL)[:2]
    with torch.no_grad():
        assert_close(cond, pipe["compel"](prompt), prompt)
        assert_close(pooled, pooled_compel.conditioning_provider.get_pooled_embeddings([prompt]), prompt)
        unweighted = '("fire", "flames").and()'  # weights of 1: requires_pooled works
        assert pooled_compel(unweighted)[0].shape == (1, 154, WIDTH)


@pytest.mark.parametrize("prompt", WEIGHTED_AND)
def test_weighted_and_crashes_compels_sdxl_setup(sdxl, prompt):
    with_pooled, cond_only, _ = sdxl[True]
    with pytest.raises(AttributeError, match="'tuple' object has no attribute 'shape'"), torch.no_grad():
        with_pooled(prompt)
    cond, pooled = textenc_encode(sdxl, prompt)
    with torch.no_grad():
        max_error(cond, cond_only(prompt), prompt)
        max_error(pooled, with_pooled.conditioning_provider.get_pooled_embeddings([prompt]), prompt + " (pooled)")


@pytest.mark.parametrize("prompt", ['("fire", "fire flames").blend(0.7, 0.3)', '("mountain", "man").blend()'])
def test_blend_crashes_compels_multi_encoder_setup(sdxl, prompt):
    """``Compel(tokenizer=[...], text_encoder=[...])``: TypeError on a ``.blend()``, with
    ``requires_pooled`` or without; textenc equals one ``Compel`` per encoder."""
    with_pooled, cond_only, (per_l, per_g) = sdxl[True]
    for multi in (with_pooled, cond_only):
        with pytest.raises(TypeError, match="expected Tensor as element 0 .* but got list"), torch.no_grad():
            multi(prompt)
    cond, pooled = textenc_encode(sdxl, prompt)
    with torch.no_grad():
        cond_g, pooled_g = per_g(prompt)
        max_error(cond, torch.cat([per_l(prompt), cond_g], dim=-1), prompt)
        max_error(pooled, pooled_g, prompt + " (pooled)")


# ---- embedding:name ------------------------------------------------------------------------

def test_embedding_names_are_plain_text_as_in_compel(pipe, tmp_path):
    """compel (no textual inversion manager) encodes ``embedding:my_style`` as text;
    so does textenc's compel syntax, even where an embedding of that name exists."""
    prompt = "embedding:my_style (cat)0.5"
    save_file({"emb_params": torch.randn(2, WIDTH)}, tmp_path / "my_style.safetensors")
    with_embeddings = SDTokenizer(embedding_directory=str(tmp_path), embedding_size=WIDTH)
    comfy = with_embeddings.tokenize_with_weights("embedding:my_style cat")
    assert isinstance(comfy[0][1][0], torch.Tensor)  # the comfy syntax does load it
    tokens = with_embeddings.tokenize_with_weights(prompt, syntax="compel")
    assert tokens == pipe["textenc_tokenizer"].tokenize_with_weights(prompt, syntax="compel")
    with torch.no_grad():
        assert_close(pipe["model"].encode_token_weights(tokens, options=COMPEL)[0], pipe["compel"](prompt), prompt)
