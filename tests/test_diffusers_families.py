"""textenc.diffusers on tiny random SD3, Flux and Wan pipelines (issue 26 point 5).

Where equality with the pipeline's own ``encode_prompt`` holds (fp32, short unweighted prompts):

* Flux: ComfyUI pads T5 to 256 tokens, FluxPipeline to ``max_sequence_length`` (512 by
  default); T5 runs unmasked, so the rows depend on that length. Equal when both use the
  same length: the pipeline's ``max_sequence_length=256`` against textenc's default, or
  textenc's ``max_sequence_length=512`` against the pipeline's default. Pooled: CLIP-L's
  unprojected pooled output in both.
* SD3: CLIP-L and CLIP-G at ``hidden_states[-2]`` without the final norm in both; T5 256
  (pipeline) against ComfyUI's 77, as for Flux. Pooled: diffusers takes L's *projected*
  ``text_embeds``, ComfyUI L's unprojected pooled output: equal when L's ``text_projection``
  is the identity (the fixture sets it so; the other case is tested too).
* Wan: masked UMT5, rows after ``</s>`` zero, 512 tokens in both.

Long (past the pipeline's truncation) and weighted prompts are ComfyUI's, and the pipeline
runs on them (marked slow).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

import pipeline_fixtures as fixtures  # noqa: E402
from textenc.diffusers import encode_for_pipeline, load_from_diffusers  # noqa: E402
from textenc.errors import LayerError, TextencError  # noqa: E402

ATOL = 1e-5
SHORT = "a photo of a cat, high quality"
NEGATIVE = "blurry, low quality"
LONG = ", ".join(["a very detailed painting of a red fox in the snow"] * 40)  # > 512 T5 tokens
WEIGHTED = "a (red:1.4) fox in the (snow:0.7)"


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    torch.set_num_threads(1)
    return {"sd3": fixtures.sd3_pipeline(), "flux": fixtures.flux_pipeline(),
            "wan": fixtures.wan_pipeline(tmp_path_factory.mktemp("wan"))}


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=ATOL, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("ours,theirs", [(None, 256), (512, 512)])
def test_flux_equals_encode_prompt_at_the_same_t5_length(pipes, ours, theirs):
    pipe = pipes["flux"]
    embeds, pooled, _ = pipe.encode_prompt(SHORT, None, max_sequence_length=theirs)
    got = encode_for_pipeline(pipe, SHORT, max_sequence_length=ours)
    _close(got["prompt_embeds"], embeds)
    _close(got["pooled_prompt_embeds"], pooled)
    assert set(got) == {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                        "negative_pooled_prompt_embeds"}


@pytest.mark.parametrize("ours,theirs", [(None, 77), (256, 256)])
def test_sd3_equals_encode_prompt_at_the_same_t5_length(pipes, ours, theirs):
    pipe = pipes["sd3"]
    want = pipe.encode_prompt(SHORT, None, None, negative_prompt=NEGATIVE, max_sequence_length=theirs)
    got = encode_for_pipeline(pipe, SHORT, NEGATIVE, max_sequence_length=ours)
    for value, name in zip(want, ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                  "negative_pooled_prompt_embeds")):
        _close(got[name], value)
    assert got["prompt_embeds"].shape[1] == 77 + theirs


def test_sd3_pooled_takes_clip_l_unprojected_as_comfyui():
    pipe = fixtures.sd3_pipeline(identity_l_projection=False)
    got = encode_for_pipeline(pipe, SHORT)
    ids = pipe.tokenizer(SHORT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    l_pooled = pipe.text_encoder.text_model(ids).pooler_output  # before text_projection
    _close(got["pooled_prompt_embeds"][:, :16], l_pooled)
    diffusers_pooled = pipe.encode_prompt(SHORT, None, None, do_classifier_free_guidance=False)[2]
    assert not torch.allclose(got["pooled_prompt_embeds"][:, :16], diffusers_pooled[:, :16], atol=1e-3)


def test_wan_equals_encode_prompt(pipes):
    pipe = pipes["wan"]
    embeds, negative = pipe.encode_prompt(SHORT, NEGATIVE, max_sequence_length=512)
    got = encode_for_pipeline(pipe, SHORT, NEGATIVE)
    assert set(got) == {"prompt_embeds", "negative_prompt_embeds"}  # Wan has no pooled output
    _close(got["prompt_embeds"], embeds)
    _close(got["negative_prompt_embeds"], negative)


@pytest.mark.parametrize("kind,minimum", [("flux", 256), ("sd3", 77 + 77), ("wan", 512)])
def test_long_and_weighted_prompts_go_past_the_truncation_in_one_shape(pipes, kind, minimum):
    pipe = pipes[kind]
    got = encode_for_pipeline(pipe, [LONG, WEIGHTED], "")
    embeds = got["prompt_embeds"]
    assert embeds.shape[0] == 2 and embeds.shape[1] > 512 + (77 * 4 if kind == "sd3" else 0)
    assert got["negative_prompt_embeds"].shape == embeds.shape
    clip = load_from_diffusers(pipe)
    alone = clip.encode_from_tokens(clip.tokenize(LONG))  # the longest prompt: ComfyUI's encoding itself
    _close(embeds[:1], alone)
    weighted = encode_for_pipeline(pipe, WEIGHTED)["prompt_embeds"]
    plain = encode_for_pipeline(pipe, "a red fox in the snow")["prompt_embeds"]
    assert weighted.shape[1] == plain.shape[1] == minimum and not torch.allclose(weighted, plain)


def test_folder_loads_as_the_pipeline_object(pipes, tmp_path):
    for kind in ("sd3", "flux", "wan"):
        pipe = pipes[kind]
        folder = tmp_path / kind
        pipe.save_pretrained(folder)
        if kind == "wan":  # transformers 5 saves tokenizer.json only; Wan's released folders carry spiece.model
            (folder / "tokenizer" / "spiece.model").write_bytes(fixtures.spiece_bytes())
        from_folder = encode_for_pipeline(load_from_diffusers(folder), SHORT, NEGATIVE)
        from_object = encode_for_pipeline(pipe, SHORT, NEGATIVE)
        assert from_folder.keys() == from_object.keys()
        for name in from_object:
            assert torch.equal(from_folder[name], from_object[name]), (kind, name)
        assert load_from_diffusers(folder).clip_type == kind


def test_bad_arguments(pipes):
    with pytest.raises(LayerError, match="clip_skip=1: Flux .*layer="):
        encode_for_pipeline(pipes["flux"], SHORT, clip_skip=1)
    from test_diffusers import _build_pipeline  # the tiny SD1 pipeline of the SD1/SD2/SDXL tests
    with pytest.raises(TextencError, match="max_sequence_length is for T5 pipelines"):
        encode_for_pipeline(_build_pipeline("sd1"), SHORT, max_sequence_length=77)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd3", "flux", "wan"])
def test_the_pipeline_runs_on_long_weighted_embeds(pipes, kind):
    pipe = pipes[kind]
    kwargs = encode_for_pipeline(pipe, LONG + ", (glowing:1.3)", "blurry")
    size = dict(height=32, width=32) if kind != "wan" else dict(height=16, width=16, num_frames=5)
    extra = {"guidance_scale": 3.5} if kind != "flux" else {}
    out = pipe(**kwargs, num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(0), **size, **extra)
    result = out.images if hasattr(out, "images") else out.frames
    assert torch.isfinite(torch.as_tensor(result)).all()
