"""``syntax="compel"`` + ``weight_mode="compel"`` against the real compel package.

The oracle is compel itself, used as a diffusers user would:
``Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)`` (its
defaults: truncation on, last hidden state, masking down-weights) and
``truncate_long_prompts=False``. The text encoder is a tiny random transformers
``CLIPTextModel`` (SDPA, fp32) with the bundled CLIP vocabulary; textenc loads
the same weights from a safetensors file in the HF layout. Prompts
(``compel_prompts.PROMPTS``) cover every construct and compel's own parser test
cases (damian0815/compel, test/test_prompt_parser.py). The pooled output is
compared with ``requires_pooled=True``. Tolerance 1e-5. SDXL: test_compel_sdxl.py.
"""

from __future__ import annotations

import pytest
import torch

compel = pytest.importorskip("compel")
transformers = pytest.importorskip("transformers")

import compel_prompts  # noqa: E402
from compel_prompts import ALL, LONG_SENTENCES, LONG_SPAN, PROMPTS, compel_structure, textenc_structure  # noqa: E402
from random_weights import randomize_  # noqa: E402
from textenc.text_encoders.weighting.compel import empty_conditioning, pad_conditioning_tensors_to_same_length
from textenc.errors import PromptError  # noqa: E402
from textenc.sd import load_clip  # noqa: E402
from textenc.prompts.tokenizer import DEFAULT_VOCAB, SDTokenizer  # noqa: E402

TOL = 1e-5
START, END = 49406, 49407
WIDTH, LAYERS = 64, 2
COMPEL = {"weight_mode": "compel"}


# ---- fixtures ------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_compel_parser():
    """compel's own parser, built once and memoized (see :func:`compel_prompts.one_compel_parser`)."""
    with compel_prompts.one_compel_parser(compel) as parser:
        yield parser


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A tiny 'pipeline': HF tokenizer + text encoder, and textenc on the same weights."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=2,
        hidden_act="quick_gelu", eos_token_id=END, bos_token_id=START, pad_token_id=END)
    text_encoder = transformers.CLIPTextModel._from_config(config, attn_implementation="sdpa").eval()
    randomize_(text_encoder, 0)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB, model_max_length=77)
    folder = tmp_path_factory.mktemp("compel")
    text_encoder.save_pretrained(folder)  # the HF layout on disk, as a pipeline's text_encoder/ folder
    clip = load_clip(folder / "model.safetensors", clip_type="sd1", text_configs={"l": {
        "vocab_size": 49408, "hidden_size": WIDTH, "intermediate_size": 128, "num_hidden_layers": LAYERS,
        "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5, "projection_dim": WIDTH, "bos_token_id": START, "eos_token_id": END,
        "pad_token_id": END}})
    model = clip.cond_stage_model.clip_l
    return {"clip": clip, "tokenizer": tokenizer, "text_encoder": text_encoder, "model": model, "textenc_tokenizer": SDTokenizer(),
            "compel": compel.Compel(tokenizer=tokenizer, text_encoder=text_encoder),
            "compel_long": compel.Compel(tokenizer=tokenizer, text_encoder=text_encoder, truncate_long_prompts=False)}


def textenc_cond(pipe, prompt: str, **kwargs) -> torch.Tensor:
    tokens = pipe["textenc_tokenizer"].tokenize_with_weights(prompt, syntax="compel", **kwargs)
    return pipe["model"].encode_token_weights(tokens, options=COMPEL)[0]


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, prompt: str) -> None:
    assert ours.shape == theirs.shape, (prompt, ours.shape, theirs.shape)
    error = (ours - theirs).abs().max().item()
    assert error <= TOL, (prompt, error)


# ---- conditioning -------------------------------------------------------------------

def test_prompt_set_is_large_and_covers_every_construct():
    assert len(ALL) >= 100 and all(PROMPTS.values())
    assert len(pipe_free_tokens(LONG_SPAN)) > 75  # the long prompts really are long


def pipe_free_tokens(prompt: str) -> list[int]:
    return SDTokenizer().encode_units([prompt])[0]


@pytest.mark.parametrize("group", sorted(PROMPTS))
def test_equals_compel_with_its_defaults(pipe, group):
    """``Compel(tokenizer=..., text_encoder=...)(prompt)`` (truncating to 77 tokens)."""
    for prompt in PROMPTS[group]:
        with torch.no_grad():
            theirs = pipe["compel"](prompt)
        assert_close(textenc_cond(pipe, prompt), theirs, prompt)


@pytest.mark.parametrize("group", sorted(PROMPTS))
def test_equals_compel_without_truncation(pipe, group):
    """``truncate_long_prompts=False``: compel's chunking, masks across chunk edges."""
    for prompt in PROMPTS[group]:
        with torch.no_grad():
            theirs = pipe["compel_long"].build_conditioning_tensor(prompt)
        assert_close(textenc_cond(pipe, prompt, truncate_long_prompts=False), theirs, prompt)


def test_long_prompts_make_several_chunks(pipe):
    for prompt in PROMPTS["long"]:
        tokens = pipe["textenc_tokenizer"].tokenize_with_weights(prompt, syntax="compel", truncate_long_prompts=False)
        assert len(tokens) >= 2 and all(len(w) == 77 for w in tokens)


def test_padding_positive_and_negative_like_compel(pipe):
    positive, negative = LONG_SENTENCES, "ugly, (blurry)0.5"
    with torch.no_grad():
        theirs = pipe["compel_long"]([positive, negative])
    ours = pad_conditioning_tensors_to_same_length(
        [textenc_cond(pipe, positive, truncate_long_prompts=False),
         textenc_cond(pipe, negative, truncate_long_prompts=False)], empty_conditioning(pipe["model"]))
    assert ours[0].shape == ours[1].shape
    assert_close(torch.cat(ours), theirs, "positive/negative pair")
    with pytest.raises(PromptError, match="multiples"):
        pad_conditioning_tensors_to_same_length([ours[0], ours[0][:, :5]], empty_conditioning(pipe["model"]))


def test_comfy_syntax_with_compel_weights_is_compel_on_the_same_weights(pipe):
    """``weight_mode="compel"`` on ComfyUI-parsed weights: runs of equal weight are fragments."""
    pairs = [("a (cat:0.5) sitting on a mat", "a (cat)0.5 sitting on a mat"),
             ("(red:0.2) (ball:0.2) on grass", "(red ball)0.2 on grass"),
             ("a (cat:0) on (a mat:1.3)", "a (cat)0 on (a mat)1.3"),
             ("(dog:0.7) and (cat:0.4)", "(dog)0.7 and (cat)0.4")]
    tokenizer = pipe["textenc_tokenizer"]
    for comfy_prompt, compel_prompt in pairs:
        for word_ids in (False, True):
            tokens = tokenizer.tokenize_with_weights(comfy_prompt, word_ids)
            ours = pipe["model"].encode_token_weights(tokens, options=COMPEL)[0]
            with torch.no_grad():
                assert_close(ours, pipe["compel"](compel_prompt), comfy_prompt)


@pytest.mark.slow
def test_pooled_equals_compels_requires_pooled(pipe, one_compel_parser):
    """``Compel(..., requires_pooled=True)`` pools the raw prompt text (markup included,
    cut to 77 tokens); so does textenc. Where that compel crashes (a weighted
    ``.and()``), its pooled output is what its ``get_pooled_embeddings([text])`` gives."""
    pooled_compel = compel.Compel(tokenizer=pipe["tokenizer"], text_encoder=pipe["text_encoder"],
                                  requires_pooled=True)
    for prompt in ALL:
        tokens = pipe["textenc_tokenizer"].tokenize_with_weights(prompt, syntax="compel")
        ours = pipe["model"].encode_token_weights(tokens, options=COMPEL)[1]
        with torch.no_grad():
            if compel_prompts.and_weighted(one_compel_parser, prompt):
                with pytest.raises(AttributeError):
                    pooled_compel(prompt)
                theirs = pooled_compel.conditioning_provider.get_pooled_embeddings([prompt])
            else:
                theirs = pooled_compel(prompt)[1]
        assert_close(ours, theirs, prompt)


def test_clip_wrapper_carries_the_dialect(pipe):
    """``CLIP.tokenize(..., syntax="compel")`` + ``encode_from_tokens(options=...)``."""
    prompt = "a (red fox)1.3 in (deep snow)0.4, (golden hour)0"
    clip = pipe["clip"]
    cond = clip.encode_from_tokens(clip.tokenize(prompt, syntax="compel"), options=COMPEL)
    with torch.no_grad():
        assert_close(cond, pipe["compel"](prompt), prompt)


def test_embedding_names_are_plain_text(pipe):
    tokens = pipe["textenc_tokenizer"].tokenize_with_weights("embedding:my_style cat", syntax="compel")
    assert [t for t, _ in tokens[0][1:6]] == pipe["tokenizer"]("embedding:my_style cat")["input_ids"][1:6]


def test_masked_encodes_run_in_one_batched_forward(pipe):
    model = pipe["model"]
    tokens = pipe["textenc_tokenizer"].tokenize_with_weights("a (red)0.5 fox in (snow)0.2, (night)1.2",
                                                            syntax="compel")
    model.encode_token_weights(tokens, options=COMPEL)  # fills the empty-prompt cache
    batches = []
    hook = model.transformer.register_forward_hook(
        lambda module, args, kwargs, out: batches.append(kwargs["embeds"].shape[0]), with_kwargs=True)
    try:
        model.encode_token_weights(tokens, options=COMPEL)
    finally:
        hook.remove()
    assert batches == [2, 2]  # the prompt and its raw text (pooled), then both masked copies


def test_inspect_reports_compel_fragments(pipe):
    report = pipe["textenc_tokenizer"].inspect("a (red fox)0.5 in snow++", syntax="compel")
    assert [(u.text, u.weight, u.num_tokens) for u in report.units] == [
        ("a", 1.0, 1), ("red fox", 0.5, 2), ("in", 1.0, 1), ("snow", pow(1.1, 2), 1)]
    assert [t.text for t in report.windows[0][:6]] == ["<|startoftext|>", "a</w>", "red</w>", "fox</w>", "in</w>",
                                                       "snow</w>"]


def test_doctests():
    import doctest

    from textenc.prompts.dialects.compel import (grammar as compel_grammar, parser as compel_parser, tokens as compel_tokens)
    from textenc.text_encoders.weighting import compel as compel_weighting

    for module in (compel_grammar, compel_parser, compel_tokens, compel_weighting):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_compel_syntax_defaults_to_compel_weights():
    from textenc.prompts.dialects import default_weight_mode

    assert default_weight_mode("compel") == "compel"


def test_tokens_keep_comfyui_shapes(pipe):
    tokenizer = pipe["textenc_tokenizer"]
    plain = tokenizer.tokenize_with_weights("a (cat)0.5", syntax="compel")
    with_ids = tokenizer.tokenize_with_weights("a (cat)0.5", True, syntax="compel")
    assert {len(t) for w in plain for t in w} == {2} and {len(t) for w in with_ids for t in w} == {3}
    assert [tuple(t) for t in plain[0][:4]] == [(START, 1.0), (320, 1.0), (2368, 0.5), (END, 1.0)]
    for token, weight in plain[0]:  # plain unpacking works, as ComfyUI code does
        assert isinstance(token, int) and isinstance(weight, float)


# ---- grammar ---------------------------------------------------------------------------

def test_grammar_equals_compels_parser(one_compel_parser):
    for prompt in ALL:
        assert textenc_structure(prompt) == compel_structure(one_compel_parser, prompt), prompt


@pytest.mark.parametrize("prompt, match", [
    ("a cat.swap(dog)", r"\.swap"), ('a "cat".swap(dog) eating', r"\.swap"), ("(fire).swap(trees)", r"\.swap"),
    ("mountain man withLora(hairy, 0.5)", "LoRA"), ("useLora(x) a cat", "LoRA"),
    ('("fire", "fire flames").blend(0.7, 0.3, 0.1)', "weight"), ('("fire", "flames").and(2)', "weight"),
    ('("a", "b").blend(0.5, 0.5) trailing', "after .blend"), ('("a", "b").and(s_start=1)', "numbers"),
    ('("mountain, man", "face, eyes--").blend(1,-1)', "sum to 0"),
    ("(" * 3000 + "x" + ")" * 3000, "too deeply"), (123, "must be a str"),
])
def test_refusals_are_prompt_errors(pipe, prompt, match):
    with pytest.raises(PromptError, match=match):
        pipe["textenc_tokenizer"].tokenize_with_weights(prompt, syntax="compel")


def test_bad_truncate_flag_is_a_prompt_error(pipe):
    with pytest.raises(PromptError, match="truncate_long_prompts"):
        pipe["textenc_tokenizer"].tokenize_with_weights("a", syntax="compel", truncate_long_prompts="no")
