"""``syntax="compel"`` on Flux (issue 26 point 6) against compel 2.5.1's own ``CompelForFlux``
(``compel.convenience_wrappers``) on a tiny random diffusers ``FluxPipeline``: cond (T5) and
pooled (CLIP-L) within 1e-5 relative in fp32, at 1 and 2 torch threads, through every entry
point that takes ``syntax`` (the library, ``encode_for_pipeline``, the CLI, ``encode-dataset``,
the advanced encode node). compel is only the oracle here.

What compel defines and textenc therefore refuses with a ``PromptError``: ``.and()`` /
``.blend()`` of several prompts (compel returns one pooled row per prompt for a one-row cond),
``truncate_long_prompts=False`` (CompelForFlux truncates), a T5 minimum above compel's chunk;
SD3 and Wan, which compel does not define, keep refusing compel naming the syntax that applies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
compel_wrappers = pytest.importorskip("compel.convenience_wrappers")

import pipeline_fixtures as fixtures  # noqa: E402
from dataset_fixtures import checkout_env, encoder  # noqa: E402
from textenc.diffusers import encode_for_pipeline, load_from_diffusers  # noqa: E402
from textenc.errors import PromptError, PromptWarning  # noqa: E402
from textenc.prompts.dialects import default_weight_mode  # noqa: E402
from textenc.sd import load_clip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RELATIVE = 1e-5
LONG = ", ".join(["a very detailed painting of a red fox in the snow"] * 50)  # > 511 T5 and > 75 CLIP tokens
PROMPTS = [
    "a photo of a (cat)1.3 on a mat",
    "a cat++ on a (mat)--",
    "a (red fox)0.5 in the (deep snow)0.8, highly detailed",
    "a (red fox)0 in snow",
    "(a (nested (weights)1.2)0.9)1.1 here",
    r"a \(literal\) cat, \"quoted\" and (fox)1.1",
    '("a red fox in snow").blend(0.5)',
    '("a red fox in snow").and()',
    "",
    LONG,
    "(a cat)0.7, " + LONG,
    LONG + ", (in the end)1.4",
]


@pytest.fixture(scope="module")
def pipe():
    return fixtures.flux_pipeline()


@pytest.fixture(scope="module")
def oracle(pipe):
    return compel_wrappers.CompelForFlux(pipe)


@pytest.fixture(scope="module")
def clip(pipe):
    return load_from_diffusers(pipe)


@pytest.fixture(scope="module")
def from_files(pipe, tmp_path_factory):
    """``(files, oracle)``: the encoders as single files (transformers' keys), for the CLI, the dataset
    and the node, and CompelForFlux on the same modules. CLIP-L is 64 wide with one head, the shape a
    file's weights tell textenc (a file holds no head count: width / 64); T5 is the pipeline's."""
    import transformers
    from safetensors.torch import save_file

    from random_weights import randomize_

    config = transformers.CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=1, hidden_act="quick_gelu", pad_token_id=49407,
                                         bos_token_id=49406, eos_token_id=49407)
    clip_l = transformers.CLIPTextModel._from_config(config, attn_implementation="sdpa")
    randomize_(clip_l, 11)
    clip_l.eval()
    folder = tmp_path_factory.mktemp("flux_files")
    t5_sd = {k: v.contiguous() for k, v in pipe.text_encoder_2.state_dict().items()
             if k != "encoder.embed_tokens.weight"}
    save_file({k: v.contiguous() for k, v in clip_l.state_dict().items()}, str(folder / "clip_l.safetensors"))
    save_file(t5_sd, str(folder / "t5xxl.safetensors"))
    parts = SimpleNamespace(tokenizer=pipe.tokenizer, text_encoder=clip_l, tokenizer_2=pipe.tokenizer_2,
                            text_encoder_2=pipe.text_encoder_2)
    return [str(folder / "clip_l.safetensors"), str(folder / "t5xxl.safetensors")], \
        compel_wrappers.CompelForFlux(parts)


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """``‖got - want‖ / ‖want‖ ≤ 1e-5`` (Frobenius), and no element off by more than 1e-4 of the
    largest. The floor is the encoders' own: textenc's T5 and transformers' ``T5EncoderModel`` on
    the same ids and mask differ by up to ~6e-6 of the largest element on this tiny random T5."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    difference = got.float() - want.float()
    relative = float(difference.norm() / want.float().norm().clamp_min(1e-30))
    assert relative <= RELATIVE, (what, relative)
    assert float(difference.abs().max()) <= 10 * RELATIVE * float(want.abs().max()), (what, "element")


def ours(clip, text: str):
    tokens = clip.tokenize(text, syntax="compel")
    return clip.encode_from_tokens(tokens, return_pooled=True, options={"weight_mode": default_weight_mode("compel")})


# ---- the library --------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::textenc.errors.PromptWarning")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("text", PROMPTS)
def test_cond_and_pooled_equal_compel_for_flux(clip, oracle, text, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want = oracle(text)
        cond, pooled = ours(clip, text)
    finally:
        torch.set_num_threads(previous)
    close(cond, want.embeds, "cond")
    close(pooled, want.pooled_embeds, "pooled")
    assert cond.shape[1] == 512  # compel's T5 chunk (tokenizer_2.model_max_length), not ComfyUI's 256
    assert torch.equal(clip.encode(text, syntax="compel"), cond)  # CLIP.encode takes the syntax's weight mode


def test_no_weights_bypass_disabled_is_the_same_within_rounding(pipe, clip):
    oracle = compel_wrappers.CompelForFlux(pipe)
    oracle.disable_no_weights_bypass()
    for text in ("a photo of a (cat)1.3 on a mat", "a (red fox)0.5 in the snow"):
        want = oracle(text)
        cond, pooled = ours(clip, text)
        close(cond, want.embeds, "cond")
        close(pooled, want.pooled_embeds, "pooled")


def test_truncation_warns_and_comfy_stays_comfyui(clip):
    with pytest.warns(PromptWarning, match="syntax='compel' dropped"):
        clip.tokenize(LONG, syntax="compel")
    comfy = clip.tokenize("a photo of a cat")
    assert len(comfy["t5xxl"][0]) == 256  # syntax="comfy": ComfyUI's Flux minimum, unchanged


def test_pooled_reads_the_fragments_text_unweighted(clip):
    """CompelForFlux's CLIP-L (``ReturnedEmbeddingsType.POOLED``): the fragments joined by a space,
    markup and weights gone, so a re-weighted prompt keeps its pooled output."""
    window = clip.tokenize("a (red fox)1.4 in (snow)0.3", syntax="compel")["l"]
    assert len(window) == 1 and {w for _, w in window[0]} == {1.0}
    assert [t for t, _ in window[0]] == [t for t, _ in clip.tokenize("a red fox in snow")["l"][0]]
    assert torch.equal(ours(clip, "a (red fox)1.4 in (snow)0.3")[1], ours(clip, "a red fox in snow")[1])


def test_inspect_reads_both_parts(clip):
    t5 = clip.tokenizer.t5xxl.inspect("a (red fox)0.5 in snow", syntax="compel")
    assert len(t5.windows) == 1 and len(t5.windows[0]) == 512
    assert [u.weight for u in t5.units] == [1.0, 0.5, 1.0]
    l_part = clip.tokenizer.clip_l.inspect("a (red fox)0.5 in snow", syntax="compel")
    assert [u.text for u in l_part.units] == ["a red fox in snow"]


# ---- what compel does not define on Flux -----------------------------------------------------

@pytest.mark.parametrize("text,match", [
    ('("a cat", "a dog").and()', "2 pooled rows"),
    ('("a cat", "a dog").blend(0.7, 0.3)', "2 pooled rows"),
    ('("a cat").and(0.5)', "weight of 0.5"),
])
def test_prompts_without_one_pooled_row_are_refused(clip, oracle, text, match):
    with pytest.raises(PromptError, match=match):
        clip.tokenize(text, syntax="compel")
    if "2 pooled" in match:  # the fact behind the refusal: compel's pooled batch does not fit its cond
        assert oracle(text).pooled_embeds.shape[0] == 2


def test_no_truncation_and_longer_t5_are_refused(pipe, clip):
    with pytest.raises(PromptError, match="truncate_long_prompts=False is not defined here: compel's CompelForFlux"):
        clip.tokenize("a cat", syntax="compel", truncate_long_prompts=False)
    with pytest.raises(PromptError, match="truncate_long_prompts=False is not defined here"):
        encode_for_pipeline(pipe, "a cat", syntax="compel", truncate_long_prompts=False)
    with pytest.raises(PromptError, match="compel's chunk of 512 tokens"):
        encode_for_pipeline(pipe, "a cat", syntax="compel", max_sequence_length=1024)
    got = encode_for_pipeline(pipe, "a cat", syntax="compel", max_sequence_length=512)
    assert got["prompt_embeds"].shape[1] == 512


@pytest.mark.parametrize("kind", ["sd3", "wan"])
def test_sd3_and_wan_still_refuse_compel_naming_the_syntaxes_that_apply(kind, tmp_path):
    pipe = fixtures.sd3_pipeline() if kind == "sd3" else fixtures.wan_pipeline(tmp_path)
    with pytest.raises(PromptError, match=r"syntax='compel' is not defined for .*"
                                          r"the syntaxes that apply: 'comfy'"):
        encode_for_pipeline(pipe, "a (cat)1.3", syntax="compel")


# ---- diffusers ----------------------------------------------------------------------------

def test_encode_for_pipeline_with_negatives_equals_compel_for_flux(pipe, oracle):
    prompts = ["a photo of a (cat)1.3 on a mat", "a (red fox)0.5 in the snow"]
    negative = "blurry, (low quality)1.2"
    want = oracle(prompts, negative_prompt=negative)
    got = encode_for_pipeline(pipe, prompts, negative, syntax="compel")
    close(got["prompt_embeds"], want.embeds, "prompt_embeds")
    close(got["pooled_prompt_embeds"], want.pooled_embeds, "pooled_prompt_embeds")
    close(got["negative_prompt_embeds"], want.negative_embeds, "negative_prompt_embeds")
    close(got["negative_pooled_prompt_embeds"], want.negative_pooled_embeds, "negative_pooled_prompt_embeds")
    pipe(**got, num_inference_steps=1, height=16, width=16, guidance_scale=1.0, output_type="latent")


def test_the_pipelines_t5_model_max_length_is_compels_chunk(pipe):
    """compel chunks T5 at ``tokenizer_2.model_max_length``; load_from_diffusers reads it."""
    import diffusers
    import transformers

    tokenizer_2 = transformers.T5TokenizerFast(tokenizer_file=str(Path(fixtures.T5_VOCAB) / "tokenizer.json"),
                                               model_max_length=128)
    short = diffusers.FluxPipeline(**{**pipe.components, "tokenizer_2": tokenizer_2})
    oracle = compel_wrappers.CompelForFlux(short)
    for text in ("a (red fox)0.5 in the (deep snow)1.2", LONG):
        want = oracle(text, negative_prompt="blurry")
        got = encode_for_pipeline(short, text, "blurry", syntax="compel")
        assert got["prompt_embeds"].shape[1] == 128
        close(got["prompt_embeds"], want.embeds, "prompt_embeds")
        close(got["negative_prompt_embeds"], want.negative_embeds, "negative_prompt_embeds")
        close(got["pooled_prompt_embeds"], want.pooled_embeds, "pooled_prompt_embeds")


# ---- the CLI, the dataset, the node ----------------------------------------------------------

def test_cli_encode_equals_compel_for_flux(from_files, tmp_path):
    from safetensors import safe_open

    files, oracle = from_files
    out = tmp_path / "out.safetensors"
    texts = ["a (red fox)0.5 in the (deep snow)1.2", "a photo of a cat++"]
    command = [sys.executable, "-m", "textenc", "encode", *texts, "--model", files[0], "--model", files[1],
               "--clip-type", "flux", "--syntax", "compel", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=checkout_env(), cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    with safe_open(str(out), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        options = json.loads(handle.metadata()["options"])
    assert options["syntax"] == "compel" and options["weight_mode"] == "compel"
    conds = sorted(k for k in tensors if "pooled" not in k)
    pooled = sorted(k for k in tensors if "pooled" in k)
    assert len(conds) == len(pooled) == 2, sorted(tensors)
    for text, cond_key, pooled_key in zip(texts, conds, pooled):
        want = oracle(text)
        close(tensors[cond_key].reshape(want.embeds.shape), want.embeds, cond_key)
        close(tensors[pooled_key].reshape(want.pooled_embeds.shape), want.pooled_embeds, pooled_key)


def test_cli_inspect_shows_compels_reading_of_both_parts(from_files):
    files = from_files[0]
    command = [sys.executable, "-m", "textenc", "inspect", "a (red fox)0.5 in snow", "--model", files[0],
               "--model", files[1], "--clip-type", "flux", "--syntax", "compel", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=checkout_env(), cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    parts = json.loads(done.stdout)["parts"]
    assert parts["t5xxl"]["tokens"] == 512 and len(parts["t5xxl"]["windows"]) == 1
    assert [u["weight"] for u in parts["t5xxl"]["units"]] == [1.0, 0.5, 1.0]
    assert [u["text"] for u in parts["l"]["units"]] == ["a red fox in snow"]


def test_cli_refuses_compel_options_flux_does_not_define(from_files):
    files = from_files[0]
    command = [sys.executable, "-m", "textenc", "encode", "a cat", "--model", files[0], "--model", files[1],
               "--clip-type", "flux", "--syntax", "compel", "--no-truncate-long-prompts", "--out", "unused.safetensors"]
    done = subprocess.run(command, capture_output=True, text=True, env=checkout_env(), cwd=ROOT, timeout=600)
    assert done.returncode != 0 and "CompelForFlux" in done.stderr and "Traceback" not in done.stderr


def test_encode_dataset_equals_compel_for_flux(from_files, tmp_path):
    from textenc.dataset import open_captions

    files, oracle = from_files
    captions = ["a photo of a (cat)1.3 on a mat", "a (red fox)0.5 in the snow", "", "plain words"]
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(captions) + "\n", encoding="utf-8")
    encoder(dtype="fp32", shard_rows=3, batch_size=2)(source, files, tmp_path / "out", clip_type="flux",
                                                       syntax="compel")
    stored = list(open_captions(tmp_path / "out"))
    assert [c.id for c in stored] == list(range(len(captions)))
    for caption in stored:
        want = oracle(captions[caption.id])
        close(caption.t5.unsqueeze(0), want.embeds, f"caption {caption.id} t5")
        close(caption.pooled.unsqueeze(0), want.pooled_embeds, f"caption {caption.id} pooled")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert json.dumps(manifest).count('"compel"') >= 1


def test_encode_dataset_refuses_what_flux_compel_does_not_define_up_front(from_files, tmp_path):
    files = from_files[0]
    source = tmp_path / "captions.txt"
    source.write_text("a cat\n", encoding="utf-8")
    run = encoder(dtype="fp32")
    with pytest.raises(PromptError, match="CompelForFlux"):
        run(source, files, tmp_path / "a", clip_type="flux", syntax="compel", truncate_long_prompts=False)
    with pytest.raises(PromptError, match="compel's chunk of 512"):
        run(source, files, tmp_path / "b", clip_type="flux", syntax="compel", t5_min_length=600)
    for name in ("a", "b"):
        assert not (tmp_path / name).exists() or not any((tmp_path / name).rglob("*.safetensors"))


def test_advanced_node_equals_compel_for_flux(from_files, pack):
    files, oracle = from_files
    node = pack.NODE_CLASS_MAPPINGS["CLIPTextEncodeAdvancedTextenc"]
    clip = load_clip(files, clip_type="flux")
    text = "a (red fox)0.5 in the (deep snow)1.2"
    (conditioning,) = node().encode(clip=clip, text=text, syntax="compel")
    want = oracle(text)
    close(conditioning[0][0], want.embeds, "node cond")
    close(conditioning[0][1]["pooled_output"], want.pooled_embeds, "node pooled")
