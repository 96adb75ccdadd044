"""textenc.diffusers against tiny random diffusers pipelines (SD1, SD2, SDXL).

Parity is defined as follows (fp32, unweighted prompts of at most 75 tokens):

* SD1: ComfyUI's default (last layer, final norm) is diffusers' default.
* SD2: ComfyUI's default is the penultimate layer *with* the final layer norm;
  diffusers' default is the last layer. textenc's default is compared with
  ``final_layer_norm(hidden_states[-2])`` of the pipeline's own text encoder,
  and textenc's ``clip_skip=0`` / ``layer=-1`` with diffusers' default ``encode_prompt``.
* ``clip_skip`` is diffusers' own count: the same value picks the same hidden
  layer as the pipeline's ``encode_prompt(clip_skip=...)``.
* SDXL: both use ``hidden_states[-2]`` without the final norm; pooled from
  ``text_encoder_2``'s projection.

The text encoders are deliberately of non-standard widths and head counts
(heads not width / 64) so that shape-based guessing would fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from textenc.diffusers import encode_for_pipeline, load_from_diffusers, to_diffusers  # noqa: E402
from textenc.errors import CheckpointError, DiffusersLayoutError, LayerError, PromptError, TextencError
from textenc.prompts.tokenizer import DEFAULT_VOCAB  # noqa: E402

ATOL = 1e-5
SHORT = "a photo of a cat, high quality"
NEGATIVE = "blurry, low quality"


# ---- building tiny pipelines -------------------------------------------------------------

def _text_encoder(width: int, heads: int, act: str, *, seed: int, projection: int | None = None,
                  layers: int = 3):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(hidden_size=width, intermediate_size=2 * width + 5,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         hidden_act=act, projection_dim=projection or width)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls._from_config(config, attn_implementation="sdpa").eval()


def _tokenizer(pad: str | None = None):
    kwargs = {"pad_token": pad} if pad else {}
    return transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB, model_max_length=77, **kwargs)


def _unet(cross_width: int, *, pooled: int | None = None):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(3)
    extra = {}
    if pooled is not None:  # as diffusers' own tiny SDXL test config
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + pooled)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                in_channels=4, out_channels=4, cross_attention_dim=cross_width,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=(2, 4), norm_num_groups=8, **extra)


def _vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(4)
    # Four blocks: latents are 1/8 of the image, as with SD's VAE (64 px → 8×8 latents).
    return AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3,
                         latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8)


def _scheduler():
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing="leading")


def _build_pipeline(kind: str, *, text_encoder=None):
    import diffusers
    if kind == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(), unet=_unet(32 + 64, pooled=40), scheduler=_scheduler(),
            text_encoder=_text_encoder(32, 2, "quick_gelu", seed=1), tokenizer=_tokenizer(),
            text_encoder_2=_text_encoder(64, 2, "gelu", seed=2, projection=40),
            tokenizer_2=_tokenizer("!"))
    width, act, pad = (48, "quick_gelu", None) if kind == "sd1" else (40, "gelu", "!")
    return diffusers.StableDiffusionPipeline(
        vae=_vae(), unet=_unet(width), scheduler=_scheduler(), tokenizer=_tokenizer(pad),
        text_encoder=text_encoder or _text_encoder(width, 3 if kind == "sd1" else 5, act, seed=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _vocab_layout(tokenizer_folder: Path) -> None:
    """Rewrite a saved tokenizer as vocab.json + merges.txt (the pre-transformers-5 layout)."""
    (tokenizer_folder / "tokenizer.json").unlink()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(Path(DEFAULT_VOCAB) / name, tokenizer_folder / name)


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory) -> dict:
    """kind → (pipeline, folder with tokenizer.json, folder with vocab.json + merges.txt)."""
    out = {}
    for kind in ("sd1", "sd2", "sdxl"):
        pipe = _build_pipeline(kind)
        pipe.set_progress_bar_config(disable=True)
        json_folder = tmp_path_factory.mktemp(f"{kind}_json")
        pipe.save_pretrained(json_folder)
        vocab_folder = tmp_path_factory.mktemp(f"{kind}_vocab")
        shutil.copytree(json_folder, vocab_folder, dirs_exist_ok=True)
        for name in ("tokenizer", "tokenizer_2"):
            if (vocab_folder / name).is_dir():
                _vocab_layout(vocab_folder / name)
        out[kind] = (pipe, json_folder, vocab_folder)
    return out


# ---- references computed with the pipeline's own text encoders -----------------------------

def _reference(pipe, prompt: str, negative: str | None, **kwargs) -> dict:
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompt=prompt, device=torch.device("cpu"), num_images_per_prompt=1,
                                    do_classifier_free_guidance=True, negative_prompt=negative,
                                    **kwargs)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
             "negative_pooled_prompt_embeds")
    return {name: value for name, value in zip(names, embeds) if value is not None}


def _hidden_normed(pipe, prompt: str, index: int) -> torch.Tensor:
    """``final_layer_norm(hidden_states[index])`` of the pipeline's text encoder.

    transformers 5 flattens CLIPTextModel (no ``.text_model``), so the norm is
    looked up by name.
    """
    encoder = pipe.text_encoder
    norm = dict(encoder.named_modules())["final_layer_norm"]
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return norm(encoder(ids, output_hidden_states=True).hidden_states[index])


def _assert_close(ours: dict, reference: dict, atol: float = ATOL) -> dict:
    assert set(ours) == set(reference)
    diffs = {}
    for name, value in reference.items():
        assert ours[name].shape == value.shape, name
        assert ours[name].dtype == value.dtype, name
        diffs[name] = float((ours[name] - value).abs().max())
        assert diffs[name] <= atol, (name, diffs[name])
    return diffs


@pytest.fixture(scope="session")
def loaded(pipelines) -> dict:
    """(kind, layout) → CLIP loaded from the saved folder."""
    return {(kind, layout): load_from_diffusers(folders[1 if layout == "json" else 2])
            for kind, folders in pipelines.items() for layout in ("json", "vocab")}


# ---- parity ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["json", "vocab"])
@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_default_layer_matches_pipeline(pipelines, loaded, kind, layout):
    pipe = pipelines[kind][0]
    clip = loaded[kind, layout]
    assert clip.clip_type == kind
    ours = encode_for_pipeline(clip, SHORT, NEGATIVE)
    if kind == "sd2":  # ComfyUI's SD2 default: penultimate layer, final norm
        reference = {"prompt_embeds": _hidden_normed(pipe, SHORT, -2),
                     "negative_prompt_embeds": _hidden_normed(pipe, NEGATIVE, -2)}
        _assert_close(ours, reference)
        # diffusers' default (last layer) is diffusers' clip_skip=0 and ComfyUI's layer -1
        _assert_close(encode_for_pipeline(clip, SHORT, NEGATIVE, layer=-1), _reference(pipe, SHORT, NEGATIVE))
        ours = encode_for_pipeline(clip, SHORT, NEGATIVE, clip_skip=0)
    _assert_close(ours, _reference(pipe, SHORT, NEGATIVE))


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_clip_skip_penultimate_matches_hidden_states(pipelines, loaded, kind):
    pipe = pipelines[kind][0]
    reference = {"prompt_embeds": _hidden_normed(pipe, SHORT, -2),
                 "negative_prompt_embeds": _hidden_normed(pipe, NEGATIVE, -2)}
    _assert_close(encode_for_pipeline(loaded[kind, "json"], SHORT, NEGATIVE, layer=-2), reference)
    _assert_close(encode_for_pipeline(loaded[kind, "json"], SHORT, NEGATIVE, clip_skip=1), reference)


def test_sdxl_clip_skip_counts_from_penultimate(pipelines, loaded):
    pipe = pipelines["sdxl"][0]
    ours = encode_for_pipeline(loaded["sdxl", "json"], SHORT, NEGATIVE, clip_skip=1)
    reference = _reference(pipe, SHORT, NEGATIVE, clip_skip=1)
    # diffusers applies clip_skip to the positive prompt only.
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        assert float((ours[name] - reference[name]).abs().max()) <= ATOL
    _assert_close(encode_for_pipeline(loaded["sdxl", "json"], SHORT, NEGATIVE, layer=-3), ours, atol=0)


def test_sdxl_zero_negative_matches_force_zeros(pipelines, loaded):
    pipe = pipelines["sdxl"][0]
    assert pipe.config.force_zeros_for_empty_prompt
    ours = encode_for_pipeline(loaded["sdxl", "json"], SHORT, zero_negative=True)
    _assert_close(ours, _reference(pipe, SHORT, None))
    assert float(ours["negative_pooled_prompt_embeds"].abs().max()) == 0.0


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("threads", [1, 2])
def test_pipeline_object_is_loaded_once_and_matches_folder(pipelines, loaded, kind, threads):
    """Bit for bit: the folder's weights sit at unaligned offsets in the mapped file (the
    SDXL encoders here do), where CPU kernels would round differently; they are realigned."""
    pipe = pipelines[kind][0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = encode_for_pipeline(pipe, SHORT, NEGATIVE)
        clip = pipe._textenc_clip[2]
        second = encode_for_pipeline(pipe, SHORT, NEGATIVE)
        folder = encode_for_pipeline(loaded[kind, "json"], SHORT, NEGATIVE)
    finally:
        torch.set_num_threads(before)
    assert pipe._textenc_clip[2] is clip
    for name in folder:
        assert torch.equal(first[name], second[name])
        assert torch.equal(first[name], folder[name])


# ---- denoising with the pipelines -------------------------------------------------------

def _run(pipe, **kwargs):
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        return pipe(num_inference_steps=2, height=64, width=64, output_type="latent",
                    generator=generator, **kwargs).images


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_short_prompt_gives_the_pipelines_own_images(pipelines, kind):
    pipe = pipelines[kind][0]
    clip_skip = 0 if kind == "sd2" else None  # diffusers' default layer, see the module doc
    expected = _run(pipe, prompt=SHORT, negative_prompt=NEGATIVE)
    ours = _run(pipe, **encode_for_pipeline(pipe, SHORT, NEGATIVE, clip_skip=clip_skip))
    assert float((ours - expected).abs().max()) <= 1e-4


def _embedding_like(pipe, kind: str, words: str, folder: Path) -> None:
    """A textual inversion whose vectors are the token embeddings of ``words``: a prompt
    using it must encode exactly like the prompt with the words themselves."""
    def rows(encoder, tokenizer):
        ids = tokenizer(words, add_special_tokens=False).input_ids
        return encoder.get_input_embeddings().weight[ids].detach().clone()
    if kind == "sdxl":
        tensors = {"clip_l": rows(pipe.text_encoder, pipe.tokenizer),
                   "clip_g": rows(pipe.text_encoder_2, pipe.tokenizer_2)}
    else:
        tensors = {"emb_params": rows(pipe.text_encoder, pipe.tokenizer)}
    save_file(tensors, str(folder / "my_style.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_textual_inversion_weighted_long_batched_prompts(pipelines, kind, tmp_path):
    pipe = pipelines[kind][0]
    _embedding_like(pipe, kind, "red fox", tmp_path)
    folder = str(tmp_path)
    inversion = "a embedding:my_style in the snow"
    with_embedding = encode_for_pipeline(pipe, inversion, NEGATIVE, embedding_directory=folder)
    _assert_close(with_embedding, encode_for_pipeline(pipe, "a red fox in the snow", NEGATIVE,
                                                      embedding_directory=folder))

    long_prompt = ", ".join(f"({('cat', 'dog')[i % 2]}:1.{i % 9})" for i in range(100))  # 199 tokens
    kwargs = encode_for_pipeline(pipe, long_prompt, NEGATIVE, embedding_directory=folder)
    assert kwargs["prompt_embeds"].shape[1] == kwargs["negative_prompt_embeds"].shape[1] == 3 * 77
    one_window = encode_for_pipeline(pipe, NEGATIVE, embedding_directory=folder)["prompt_embeds"]
    empty = encode_for_pipeline(pipe, "", embedding_directory=folder)["prompt_embeds"]
    negative = kwargs["negative_prompt_embeds"]
    assert torch.equal(negative[:, :77], one_window)
    assert torch.equal(negative[:, 77:], empty.repeat(1, 2, 1))  # whole empty windows

    # One denoising run: a batch of the inversion prompt and the weighted
    # 3-window prompt, a 1-window negative, ComfyUI's layer -2.
    batch = encode_for_pipeline(pipe, [inversion, long_prompt], NEGATIVE, layer=-2,
                                embedding_directory=folder)
    single = encode_for_pipeline(pipe, inversion, NEGATIVE, layer=-2, embedding_directory=folder)
    assert batch["prompt_embeds"].shape[:2] == batch["negative_prompt_embeds"].shape[:2] == (2, 231)
    for name, value in single.items():
        assert torch.equal(batch[name][:1, :value.shape[1]], value), name
    latents = _run(pipe, **batch)
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()


# ---- weight-file layouts ----------------------------------------------------------------

def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "pipe"
    shutil.copytree(folder, target)
    return target


def test_bin_with_prefix_and_fp16_safetensors_load(pipelines, loaded, tmp_path):
    from safetensors.torch import load_file
    folder = _copy(pipelines["sd1"][1], tmp_path)
    weights = folder / "text_encoder" / "model.safetensors"
    state_dict = load_file(str(weights))
    assert not any(key.startswith("text_model.") for key in state_dict)  # transformers 5: flat
    torch.save({"text_model." + key: value for key, value in state_dict.items()},
               folder / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    expected = encode_for_pipeline(loaded["sd1", "json"], SHORT, NEGATIVE)
    _assert_close(encode_for_pipeline(load_from_diffusers(folder), SHORT, NEGATIVE), expected)

    (folder / "text_encoder" / "pytorch_model.bin").unlink()
    save_file({key: value.half() for key, value in state_dict.items()},
              str(folder / "text_encoder" / "model.fp16.safetensors"))
    clip = load_from_diffusers(folder)
    assert next(clip.cond_stage_model.parameters()).dtype == torch.float16
    half = encode_for_pipeline(clip, SHORT, NEGATIVE, dtype=torch.float32)
    _assert_close(half, expected, atol=2e-2)
    in_fp16 = encode_for_pipeline(clip, SHORT, NEGATIVE)
    assert {value.dtype for value in in_fp16.values()} == {torch.float16}


def test_dtype_and_device_apply_to_every_tensor(loaded):
    out = encode_for_pipeline(loaded["sdxl", "json"], [SHORT, "x"], "", dtype=torch.bfloat16,
                              device="cpu")
    assert set(out) == {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                        "negative_pooled_prompt_embeds"}
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    assert {v.shape[0] for v in out.values()} == {2}


# ---- errors ----------------------------------------------------------------------------

def _edit_index(folder: Path, **changes) -> None:
    path = folder / "model_index.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_wrong_folders_raise_typed_errors(pipelines, tmp_path):
    source = pipelines["sd1"][1]
    with pytest.raises(DiffusersLayoutError, match="model_index.json"):
        load_from_diffusers(source / "unet")  # a UNet-only folder
    with pytest.raises(DiffusersLayoutError, match="not a folder"):
        load_from_diffusers(source / "model_index.json")
    folder = _copy(source, tmp_path)
    _edit_index(folder, _class_name="HunyuanDiTPipeline")  # SD3, Flux and Wan are known (tests/test_diffusers_families.py)
    with pytest.raises(DiffusersLayoutError, match="HunyuanDiTPipeline.*textenc supports .*Flux\\*Pipeline"):
        load_from_diffusers(folder)
    _edit_index(folder, _class_name="StableDiffusionPipeline", text_encoder=[None, None])
    with pytest.raises(DiffusersLayoutError, match="text_encoder"):
        load_from_diffusers(folder)
    _edit_index(folder, text_encoder=["transformers", "CLIPTextModel"])
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(DiffusersLayoutError, match="text_encoder"):
        load_from_diffusers(folder)


def test_truncated_or_mismatched_weights_raise(pipelines, tmp_path):
    folder = _copy(pipelines["sd1"][1], tmp_path)
    weights = folder / "text_encoder" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_from_diffusers(folder)
    weights.write_bytes(data)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_hidden_layers": 4}))
    with pytest.raises(DiffusersLayoutError, match="missing"):
        load_from_diffusers(folder)
    config_path.write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(DiffusersLayoutError, match="model_type"):
        load_from_diffusers(folder)


@pytest.mark.parametrize("weight_map", [["model-1.safetensors"], "model-1.safetensors", {"a": 5},
                                        {"a": None}, {"a": "../model.safetensors"}, {}])
def test_malformed_shard_index_is_a_layout_error(pipelines, tmp_path, weight_map):
    folder = _copy(pipelines["sd1"][1], tmp_path)
    (folder / "text_encoder" / "model.safetensors").unlink()
    (folder / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(DiffusersLayoutError, match="weight_map must name shard files"):
        load_from_diffusers(folder)


@pytest.mark.parametrize("tokenizer_json", [
    {"model": {"vocab": {}}, "added_tokens": [{"id": 7}]},            # an added token with no content
    {"model": {"vocab": ["<|endoftext|>"]}},                         # vocab not a mapping
    {"model": {"vocab": {"<|endoftext|>": "seven"}}},                # id not a number
])
def test_malformed_tokenizer_json_is_a_layout_error(pipelines, tmp_path, tokenizer_json):
    folder = _copy(pipelines["sd1"][1], tmp_path)
    tokenizer = folder / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        (tokenizer / name).unlink(missing_ok=True)
    (tokenizer / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(DiffusersLayoutError, match="malformed tokenizer file"):
        load_from_diffusers(folder)


def test_bad_arguments(loaded):
    clip = loaded["sd1", "json"]
    with pytest.raises(LayerError, match=r"clip_skip=-2: .*pass layer=-2"):
        encode_for_pipeline(clip, SHORT, clip_skip=-2)
    with pytest.raises(LayerError, match="both"):
        encode_for_pipeline(clip, SHORT, clip_skip=1, layer=-2)
    with pytest.raises(LayerError, match="must be an integer, got 'x'"):
        encode_for_pipeline(clip, SHORT, clip_skip="x")
    with pytest.raises(PromptError, match="unknown prompt syntax 'bogus'; choose one of comfy, a1111"):
        encode_for_pipeline(clip, SHORT, syntax="bogus")
    with pytest.raises(PromptError, match="entries"):
        encode_for_pipeline(clip, [SHORT, SHORT], ["a", "b", "c"])
    with pytest.raises(TypeError):
        encode_for_pipeline(clip, SHORT, clipskip=-2)
    with pytest.raises(TypeError):
        encode_for_pipeline(clip, SHORT, NEGATIVE, -2)  # flags are keyword-only


# ---- already-encoded conditioning ------------------------------------------------------

def test_to_diffusers_from_comfy_conditioning(loaded):
    clip = loaded["sdxl", "json"]
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(SHORT))
    negative_cond, negative_pooled = clip.encode_from_tokens(clip.tokenize(NEGATIVE), return_pooled=True)
    out = to_diffusers(positive, (negative_cond, negative_pooled), kind="sdxl")
    _assert_close(out, encode_for_pipeline(clip, SHORT, NEGATIVE))
    # Lengths differ: both repeat to the LCM, as ComfyUI batches conds.
    long_cond = torch.randn(1, 154, 96)
    out = to_diffusers((long_cond, negative_pooled), [[negative_cond, {"pooled_output": negative_pooled}]],
                       kind="sdxl")
    assert torch.equal(out["negative_prompt_embeds"], negative_cond.repeat(1, 2, 1))
    with pytest.raises(TextencError, match="pooled"):
        to_diffusers([[negative_cond, {}]], kind="sdxl")
    with pytest.raises(TextencError, match="entries"):
        to_diffusers(positive + positive, kind="sdxl")
    only = to_diffusers([[negative_cond, {}]], kind="sd1")
    assert set(only) == {"prompt_embeds"}


@pytest.mark.slow
def test_from_pretrained_pipeline_matches_folder_within_rounding(pipelines, loaded):
    """A from_pretrained pipeline keeps its weights memory-mapped at the file's byte
    offsets; CPU kernels round those last bits differently (docs/diffusers.md, "Parity")."""
    import diffusers
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(pipelines["sdxl"][1])
    ours = encode_for_pipeline(pipe, SHORT, NEGATIVE)
    _assert_close(ours, encode_for_pipeline(loaded["sdxl", "json"], SHORT, NEGATIVE), atol=1e-6)
