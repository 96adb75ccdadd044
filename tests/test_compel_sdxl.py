"""SDXL ``syntax="compel"`` against the real compel's SDXL configuration.

The oracle is compel 2.5.1 as its README sets it up for SDXL:
``Compel(tokenizer=[pipe.tokenizer, pipe.tokenizer_2], text_encoder=[pipe.text_encoder,
pipe.text_encoder_2], returned_embeddings_type=PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
requires_pooled=[False, True])``, returning ``(cond, pooled)``: both encoders'
``hidden_states[-2]`` side by side, and text_encoder_2's projected pooled output of
the raw prompt text. Also ``truncate_long_prompts=False`` (long, down-weighted
and ``.and()`` prompts), and compel's
``CompelForSDXL`` wrapper (the one its deprecation warning points to) on a third
of the prompts and on a padded positive/negative pair.

The encoders are tiny random transformers models, as in a real SDXL pipeline: a
``CLIPTextModel`` (quick_gelu) and a ``CLIPTextModelWithProjection`` (gelu, its
own projection width), both with SDXL's published ``eos_token_id=2`` (pooling at
the argmax id), and diffusers' SDXL tokenizers: ``tokenizer`` pads with the end
token, ``tokenizer_2`` with ``"!"`` (id 0). textenc loads the same weights from
one safetensors file in SDXL's checkpoint key layout (``conditioner.embedders``,
the bigG half in OpenCLIP's layout). Every prompt of ``compel_prompts.PROMPTS``
(compel's own parser test cases among them) is compared; tolerance 1e-5 (fp32).

Where that setup crashes, each crash is checked and the reference is built from
compel's own pieces: a ``.blend()`` (TypeError in the multi-encoder ``Compel``)
from one ``Compel`` per encoder, as compel's ``CompelForSDXL`` builds them; an
``.and()`` with a weight other than 1 (AttributeError with ``requires_pooled``)
from compel's cond without ``requires_pooled`` and its
``get_pooled_embeddings([text])``.
"""

from __future__ import annotations

import types

import pytest
import torch

compel = pytest.importorskip("compel")
transformers = pytest.importorskip("transformers")

import compel_prompts  # noqa: E402
from compel_prompts import ALL, LONG_SENTENCES, PROMPTS  # noqa: E402
from random_weights import randomize_  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from textenc.loading.convert import to_layout  # noqa: E402
from textenc.text_encoders.weighting.compel import empty_conditioning, pad_conditioning_tensors_to_same_length  # noqa: E402
from textenc.sd import load_clip  # noqa: E402
from textenc.prompts.tokenizer import DEFAULT_VOCAB  # noqa: E402

TOL = 1e-5
COMPEL = {"weight_mode": "compel"}
L_WIDTH, G_WIDTH, G_PROJECTION, LAYERS = 64, 128, 96, 3


# ---- fixtures ------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_compel_parser():
    """compel's own parser, built once and memoized (see :func:`compel_prompts.one_compel_parser`)."""
    with compel_prompts.one_compel_parser(compel) as parser:
        yield parser


def _encoder(cls, width: int, activation: str, seed: int, projection: int | None = None):
    # bos 0 / eos 2 / pad 1: SDXL's text_encoder(_2)/config.json (eos 2 pools at the argmax id).
    config = transformers.CLIPTextConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=LAYERS,
        num_attention_heads=width // 64, projection_dim=projection or width, hidden_act=activation,
        bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = cls._from_config(config, attn_implementation="sdpa").eval()
    randomize_(model, seed)
    return model


def _hf_layout(model, folder) -> dict[str, torch.Tensor]:
    """The model's weights in the HF layout (``text_model.*``): transformers 5 saves a
    ``CLIPTextModel`` without that prefix, as its modules are flattened."""
    model.save_pretrained(folder)
    saved = load_file(str(folder / "model.safetensors"))
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
            for k, v in saved.items()}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """compel's SDXL setups and textenc's CLIP on the same tiny weights."""
    folder = tmp_path_factory.mktemp("compel_sdxl")
    enc_l = _encoder(transformers.CLIPTextModel, L_WIDTH, "quick_gelu", 11)
    enc_g = _encoder(transformers.CLIPTextModelWithProjection, G_WIDTH, "gelu", 12, projection=G_PROJECTION)
    tok_l = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB, model_max_length=77)
    tok_g = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB, model_max_length=77, pad_token="!")
    assert tok_l.pad_token_id == 49407 and tok_g.pad_token_id == 0
    state = {**to_layout(_hf_layout(enc_l, folder / "l"), "sdxl_l"),
             **to_layout(_hf_layout(enc_g, folder / "g"), "sdxl_g")}
    assert any(k.startswith("conditioner.embedders.1.model.") for k in state)
    save_file(state, str(folder / "sdxl.safetensors"))
    clip = load_clip(str(folder / "sdxl.safetensors"))
    assert clip.clip_type == "sdxl"

    def make(**kwargs):
        return compel.Compel(tokenizer=[tok_l, tok_g], text_encoder=[enc_l, enc_g],
                             returned_embeddings_type=compel.ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                             **kwargs)

    def pair(truncate: bool):  # one Compel per encoder, as compel's CompelForSDXL builds them
        penultimate = compel.ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        return (compel.Compel(tokenizer=tok_l, text_encoder=enc_l, returned_embeddings_type=penultimate,
                              truncate_long_prompts=truncate),
                compel.Compel(tokenizer=tok_g, text_encoder=enc_g, returned_embeddings_type=penultimate,
                              truncate_long_prompts=truncate, requires_pooled=True))

    pipe = types.SimpleNamespace(tokenizer=tok_l, text_encoder=enc_l, tokenizer_2=tok_g, text_encoder_2=enc_g)
    return {"clip": clip, "pipe": pipe, "folder": folder,
            True: (make(requires_pooled=[False, True]), make(), pair(True)),
            False: (make(requires_pooled=[False, True], truncate_long_prompts=False),
                    make(truncate_long_prompts=False), pair(False))}


def textenc_encode(sdxl, prompt: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    clip = sdxl["clip"]
    return clip.encode_from_tokens(clip.tokenize(prompt, syntax="compel", **kwargs), return_pooled=True,
                                   options=COMPEL)


def compel_encode(sdxl, parser, prompt: str, *, truncate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """compel's SDXL ``(cond, pooled)``. Where ``Compel([...], [...], requires_pooled=[False,
    True])`` crashes (checked): a ``.blend()`` from compel's per-encoder pair (as its
    ``CompelForSDXL``); a weighted ``.and()`` from its cond without ``requires_pooled`` and
    its ``get_pooled_embeddings([prompt])``."""
    with_pooled, cond_only, (per_l, per_g) = sdxl[truncate]
    with torch.no_grad():
        if compel_prompts.has_blend(parser, prompt):
            with pytest.raises(TypeError):
                with_pooled(prompt)
            cond_g, pooled = per_g(prompt)
            return torch.cat([per_l(prompt), cond_g], dim=-1), pooled
        if compel_prompts.and_weighted(parser, prompt):
            with pytest.raises(AttributeError):
                with_pooled(prompt)
            return cond_only(prompt), with_pooled.conditioning_provider.get_pooled_embeddings([prompt])
        return with_pooled(prompt)


def max_error(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    error = (ours - theirs).abs().max().item()
    assert error <= TOL, (what, error)
    return error


# ---- conditioning and pooled ----------------------------------------------------------

def test_prompt_set_has_the_prompts_compels_sdxl_setup_crashes_on(one_compel_parser):
    assert len(ALL) >= 100
    weighted_and = [p for p in ALL if compel_prompts.and_weighted(one_compel_parser, p)]
    blends = [p for p in ALL if compel_prompts.has_blend(one_compel_parser, p)]
    assert 0 < len(weighted_and) < 10 and all(".and(" in p or ".add(" in p for p in weighted_and)
    assert 0 < len(blends) < 20 and all(".blend(" in p for p in blends)


#: groups also compared without truncation: where chunking and the masks at chunk edges
#: differ (a short prompt is one chunk either way; the SD1 oracle runs every group).
CHUNKED_GROUPS = ("long", "down", "and")


@pytest.mark.parametrize("group, truncate", [(g, True) for g in sorted(PROMPTS)]
                         + [(g, False) for g in CHUNKED_GROUPS])
def test_equals_compels_sdxl_setup(sdxl, one_compel_parser, group, truncate):
    """cond (L ‖ G, penultimate, no final norm) and pooled (G's projection of the raw text)."""
    for prompt in PROMPTS[group]:
        cond, pooled = textenc_encode(sdxl, prompt, truncate_long_prompts=truncate)
        theirs = compel_encode(sdxl, one_compel_parser, prompt, truncate=truncate)
        max_error(cond, theirs[0], prompt)
        max_error(pooled, theirs[1], prompt + " (pooled)")
        assert cond.shape[-1] == L_WIDTH + G_WIDTH and pooled.shape == (1, G_PROJECTION)
        if group == "long":  # the long prompts really are cut (truncated) or chunked
            assert cond.shape[1] == 77 if truncate else cond.shape[1] >= 154


def test_equals_compel_for_sdxl(sdxl, one_compel_parser):
    """compel's own SDXL wrapper, ``CompelForSDXL(pipe)`` (no truncation), on every third
    prompt (each group); it crashes, as its ``Compel`` does, on a weighted ``.and()``."""
    from compel.convenience_wrappers import CompelForSDXL

    wrapper = CompelForSDXL(sdxl["pipe"])
    for prompt in ALL[::3]:
        cond, pooled = textenc_encode(sdxl, prompt, truncate_long_prompts=False)
        with torch.no_grad():
            if compel_prompts.and_weighted(one_compel_parser, prompt):
                with pytest.raises(AttributeError):
                    wrapper(prompt)
                continue
            theirs = wrapper(prompt)
        max_error(cond, theirs.embeds, prompt)
        max_error(pooled, theirs.pooled_embeds, prompt + " (pooled)")


def test_pooled_is_the_raw_text_not_the_parsed_prompt(sdxl, one_compel_parser):
    """The markup changes the pooled output: ``(cat)0.5`` pools ``( cat ) 0 . 5``."""
    marked = textenc_encode(sdxl, "a (cat)0.5 on a mat")[1]
    plain = textenc_encode(sdxl, "a cat on a mat")[1]
    assert (marked - plain).abs().max().item() > 1e-3
    max_error(marked, compel_encode(sdxl, one_compel_parser, "a (cat)0.5 on a mat")[1], "marked")


def test_positive_and_negative_pad_as_compel_for_sdxl(sdxl):
    """compel's ``CompelForSDXL`` (two ``Compel`` objects, no truncation) pads each encoder
    with its own empty prompt; ``pad_conditioning_tensors_to_same_length`` with
    ``empty_conditioning(clip)`` gives the same."""
    from compel.convenience_wrappers import CompelForSDXL

    positive, negative = LONG_SENTENCES, "ugly, (blurry)0.5"
    with torch.no_grad():
        theirs = CompelForSDXL(sdxl["pipe"])(positive, negative_prompt=negative)
    (pos, pos_pooled), (neg, neg_pooled) = (textenc_encode(sdxl, p, truncate_long_prompts=False)
                                            for p in (positive, negative))
    ours = pad_conditioning_tensors_to_same_length([pos, neg], empty_conditioning(sdxl["clip"]))
    assert ours[1].shape[1] == pos.shape[1] > neg.shape[1]
    max_error(ours[0], theirs.embeds, "positive")
    max_error(ours[1], theirs.negative_embeds, "negative")
    max_error(pos_pooled, theirs.pooled_embeds, "positive pooled")
    max_error(neg_pooled, theirs.negative_pooled_embeds, "negative pooled")


# ---- the other entry points ----------------------------------------------------------

ENTRY_PROMPTS = ['("a red fox", "a blue bird").blend(0.7, 0.3)', '("snowy forest", "a cabin").and()',
                 "a (cat)0.5 on a mat,(rug)0", "a plain caption", "hairy (mountain (\\(man\\))+)+"]


def test_encode_for_pipeline_gives_compels_numbers(sdxl, one_compel_parser):
    """Rows padded to the longest with compel's empty-prompt chunks (L ‖ G), as compel pads."""
    from textenc.diffusers import encode_for_pipeline

    negative_prompt = "ugly, (blurry)0.5"
    out = encode_for_pipeline(sdxl["clip"], ENTRY_PROMPTS, negative_prompt, syntax="compel")
    length = out["prompt_embeds"].shape[1]
    empty = compel_encode(sdxl, one_compel_parser, "")[0]
    padded = lambda cond: torch.cat([cond] + [empty] * ((length - cond.shape[1]) // 77), dim=1)  # noqa: E731
    negative = compel_encode(sdxl, one_compel_parser, negative_prompt)
    assert length == 154  # the .and() prompt has two parts
    for row, prompt in enumerate(ENTRY_PROMPTS):
        cond, pooled = compel_encode(sdxl, one_compel_parser, prompt)
        max_error(out["prompt_embeds"][row:row + 1], padded(cond), prompt)
        max_error(out["pooled_prompt_embeds"][row:row + 1], pooled, prompt + " (pooled)")
        max_error(out["negative_prompt_embeds"][row:row + 1], padded(negative[0]), "negative")
        max_error(out["negative_pooled_prompt_embeds"][row:row + 1], negative[1], "negative pooled")


def test_dataset_encoder_gives_compels_numbers(sdxl, one_compel_parser, tmp_path):
    """compel-syntax captions take the dataset's direct path; the stored rows are compel's."""
    from textenc.dataset import encode_dataset, open_shards

    path = tmp_path / "captions.txt"
    path.write_text("\n".join(ENTRY_PROMPTS) + "\n", encoding="utf-8")
    encode_dataset(path, model=sdxl["folder"] / "sdxl.safetensors", out=tmp_path / "out", syntax="compel",
                   dtype="fp32", threads=1, progress=False)
    rows = {row: (cond, pooled) for row, cond, pooled in open_shards(tmp_path / "out")}
    assert sorted(rows) == list(range(len(ENTRY_PROMPTS)))
    for row, prompt in enumerate(ENTRY_PROMPTS):
        cond, pooled = compel_encode(sdxl, one_compel_parser, prompt)
        max_error(rows[row][0].unsqueeze(0), cond, prompt)
        max_error(rows[row][1].unsqueeze(0), pooled, prompt + " (pooled)")
