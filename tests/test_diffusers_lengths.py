"""Conds of different lengths (``to_diffusers``) and an SD3 pipeline without T5, on tiny random
SD3, Flux and Wan pipelines (issue 26, left points 1 and 2).

Facts these tests rest on (diffusers 0.42, ComfyUI 618b803):

* ComfyUI's ``model_base.py`` wraps SD3's, Flux's and Wan's text conds in ``CONDRegular``, whose
  ``can_concat`` needs equal shapes: conds of different lengths are sampled in separate batches.
  Only the UNet models use ``CONDCrossAttn``, which repeats conds to their LCM length.
* ``FluxPipeline`` encodes and runs the negative in a pass of its own (``true_cfg_scale`` > 1), but
  refuses ``prompt_embeds`` and ``negative_prompt_embeds`` of different shapes when both are passed
  and true CFG is on; with ``true_cfg_scale`` = 1 (its default) the negative is not used.
* ``WanPipeline`` runs the negative in a pass of its own and checks no shapes.
* ``StableDiffusion3Pipeline`` concatenates negative and positive into one batch and refuses
  different shapes.
* ``StableDiffusion3Pipeline._get_t5_prompt_embeds`` without ``text_encoder_3`` returns zeros
  ``(B, max_sequence_length, transformer.config.joint_attention_dim)``, and the CLIP rows are padded
  to that width.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

import pipeline_fixtures as fixtures  # noqa: E402
from textenc.diffusers import encode_for_pipeline, load_from_diffusers, to_diffusers  # noqa: E402
from textenc.errors import ConditioningError  # noqa: E402

SHORT = "a photo of a cat, high quality"
LONG = ", ".join(["a very detailed painting of a red fox in the snow"] * 30)  # > 256 T5 tokens


@pytest.fixture(scope="module")
def flux():
    torch.set_num_threads(1)
    return fixtures.flux_pipeline()


def _run(pipe, **kwargs):
    out = pipe(**kwargs, num_inference_steps=1, output_type="latent", height=32, width=32,
               generator=torch.Generator().manual_seed(0))
    return out.images


def _conditioning(clip, text):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def test_flux_keeps_each_length_and_the_pipeline_runs(flux):
    clip = load_from_diffusers(flux)
    positive, negative = _conditioning(clip, LONG), _conditioning(clip, "blurry")
    out = to_diffusers(positive, negative, kind="flux")
    assert torch.equal(out["prompt_embeds"], positive[0][0])  # ComfyUI's conds, untouched
    assert torch.equal(out["negative_prompt_embeds"], negative[0][0])
    assert out["prompt_embeds"].shape[1] > 256 == out["negative_prompt_embeds"].shape[1]
    latents = _run(flux, **out)
    assert torch.isfinite(latents).all()
    # The positive pass is the one ComfyUI samples: the same latents without the negative.
    alone = _run(flux, prompt_embeds=out["prompt_embeds"], pooled_prompt_embeds=out["pooled_prompt_embeds"])
    assert torch.equal(latents, alone)
    # diffusers 0.42 runs the negative (true CFG) only at the positive's shape.
    with pytest.raises(ValueError, match="same shape"):
        _run(flux, **out, true_cfg_scale=2.0)


def test_repeating_text_tokens_changes_a_joint_attention_model(flux):
    """Why Flux and SD3 do not take ComfyUI's CONDCrossAttn repeat: unlike a UNet's
    cross-attention, the text tokens are part of the joint attention sequence."""
    clip = load_from_diffusers(flux)
    cond, pooled = _conditioning(clip, SHORT)[0][0], _conditioning(clip, SHORT)[0][1]["pooled_output"]
    once = _run(flux, prompt_embeds=cond, pooled_prompt_embeds=pooled)
    twice = _run(flux, prompt_embeds=cond.repeat(1, 2, 1), pooled_prompt_embeds=pooled)
    assert not torch.allclose(once, twice, atol=1e-4)


def test_sd3_refuses_conds_of_different_lengths():
    pooled = torch.zeros(1, 2048)
    short, long = torch.zeros(1, 77 + 77, 32), torch.zeros(1, 77 + 300, 32)
    with pytest.raises(ConditioningError, match=r"SD3: the conditioning has 377 tokens and the negative 154"):
        to_diffusers((long, pooled), (short, pooled), kind="sd3")
    out = to_diffusers((long, pooled), (long + 1, pooled), kind="sd3")
    assert out["negative_prompt_embeds"].shape == (1, 377, 32)


def test_unet_families_still_repeat_to_the_lcm():
    out = to_diffusers((torch.ones(1, 77, 8), None), (torch.zeros(1, 154, 8), None), kind="sd1")
    assert torch.equal(out["prompt_embeds"], torch.ones(1, 154, 8))


@pytest.mark.slow
def test_wan_keeps_each_length_and_the_pipeline_runs(tmp_path):
    pipe = fixtures.wan_pipeline(tmp_path)
    clip = load_from_diffusers(pipe)
    long = ", ".join(["a red fox in the snow"] * 120)
    positive, negative = _conditioning(clip, long), _conditioning(clip, "blurry")
    out = to_diffusers(positive, negative, kind="wan")
    assert out["prompt_embeds"].shape[1] > 512 == out["negative_prompt_embeds"].shape[1]
    frames = pipe(**out, num_inference_steps=1, output_type="latent", height=16, width=16, num_frames=5,
                  guidance_scale=3.5, generator=torch.Generator().manual_seed(0)).frames
    assert torch.isfinite(torch.as_tensor(frames)).all()


# ---- SD3 without text_encoder_3 ------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_without_t5():
    import diffusers
    torch.set_num_threads(1)
    pipe = fixtures.sd3_pipeline()
    return diffusers.StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})


def test_sd3_without_t5_pads_clip_to_the_transformers_width(sd3_without_t5, tmp_path):
    pipe = sd3_without_t5
    width = pipe.transformer.config.joint_attention_dim
    assert width != 4096  # the tiny transformer: ComfyUI's constant would not fit it
    got = encode_for_pipeline(pipe, SHORT, "blurry")
    # ComfyUI's cond without T5: L ‖ G padded, no T5 rows. diffusers' own: the same CLIP rows,
    # then max_sequence_length rows of zeros.
    assert got["prompt_embeds"].shape == (1, 77, width)
    want = pipe.encode_prompt(SHORT, None, None, negative_prompt="blurry", max_sequence_length=77)
    for name, value in zip(("prompt_embeds", "negative_prompt_embeds"), want[:2]):
        assert torch.allclose(got[name], value[:, :77], atol=1e-5, rtol=0), name
        assert torch.equal(value[:, 77:], torch.zeros_like(value[:, 77:]))
    for name, value in zip(("pooled_prompt_embeds", "negative_pooled_prompt_embeds"), want[2:]):
        assert torch.allclose(got[name], value, atol=1e-5, rtol=0), name
    latents = _run(pipe, **got, guidance_scale=3.5)
    assert torch.isfinite(latents).all()
    pipe.save_pretrained(tmp_path / "sd3")  # the folder reads the width from transformer/config.json
    from_folder = encode_for_pipeline(load_from_diffusers(tmp_path / "sd3"), SHORT, "blurry")
    assert all(torch.equal(from_folder[name], got[name]) for name in got)
