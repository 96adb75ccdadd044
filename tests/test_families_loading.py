"""``load_clip`` for SD3, Flux and Wan: every T5 file format of issue 25 (fp16, scaled fp8, GGUF,
a diffusers folder) through it, computed in fp32 and checked against transformers' models
holding the file's decoded weights; detection without ``clip_type``; and the typed one-line
errors for combinations that make no model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import family_reference as ref
from family_fixtures import T5_SHAPE, T5_VOCAB_SIZE, TinyFamily, weights
from t5_fixtures import scaled_fp8, write_gguf
from textenc.errors import CheckpointError
from textenc.sd import load_clip

transformers = pytest.importorskip("transformers")
PROMPT = "a (red:1.3) cat on a (mat:0.7), (\\(photo\\))"


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    error = float((got - want).abs().max())
    assert error <= rtol * float(want.abs().max()), f"max|Δ| {error:.3g}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyFamily:
    return TinyFamily(tmp_path_factory.mktemp("families"))


def hf_t5_holding(sd: dict[str, torch.Tensor]):
    """transformers' T5EncoderModel (fp32) holding ``sd``."""
    model = transformers.T5EncoderModel._from_config(
        transformers.T5Config(vocab_size=T5_VOCAB_SIZE, **T5_SHAPE), attn_implementation="sdpa")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    return model.eval()


def flux_reference(clip_l, t5, prompt=PROMPT):
    l, t5_encode = ref.clip_tokenizer(pad_with_end=True), ref.hf_t5_encode()
    tokens = {"l": l.tokenize_with_weights(prompt), "t5xxl": ref.t5_tokens(prompt, t5_encode, 256)}
    return ref.flux(tokens, clip_l=clip_l, t5=t5)


def check_flux(clip, clip_l, t5) -> None:
    cond, pooled = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
    want_cond, want_pooled = flux_reference(clip_l, t5)
    assert clip.clip_type == "flux" and cond.dtype == torch.float32
    assert_close(cond, want_cond)
    assert_close(pooled, want_pooled)


def test_fp16_files_are_computed_in_fp32(tiny, tmp_path):
    """t5xxl_fp16 / clip_l fp16: the half weights, widened, encode as in fp32 (ComfyUI's manual cast)."""
    halves = {}
    for kind, model in (("l", tiny.clip_l), ("t5", tiny.t5)):
        sd = {k: v.half() for k, v in weights(model).items()}
        save_file(sd, str(tmp_path / f"{kind}_fp16.safetensors"))
        halves[kind] = sd
    clip = load_clip([tmp_path / "l_fp16.safetensors", tmp_path / "t5_fp16.safetensors"])
    clip_l = ref_clip_l_holding(tiny, halves["l"])
    check_flux(clip, clip_l, hf_t5_holding(halves["t5"]))


def ref_clip_l_holding(tiny, sd):
    model = transformers.CLIPTextModelWithProjection._from_config(tiny.clip_l.config, attn_implementation="sdpa")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval()


@pytest.mark.parametrize("legacy", [True, False], ids=["scaled_fp8", "comfy_quant"])
def test_scaled_fp8_t5(tiny, tmp_path, legacy):
    file, packed = scaled_fp8(weights(tiny.t5), legacy=legacy)
    save_file(file, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    decoded = {**weights(tiny.t5), **{k: raw.float() * scale for k, (raw, scale) in packed.items()}}
    clip = load_clip([tiny.paths["l"], tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"], clip_type="flux")
    check_flux(clip, tiny.clip_l, hf_t5_holding(decoded))


def test_gguf_t5(tiny, tmp_path):
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as Q
    reference = write_gguf(tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf", weights(tiny.t5), Q.Q8_0)
    decoded = {k: torch.from_numpy(np.array(v, dtype=np.float32)).reshape(weights(tiny.t5)[k].shape)
               for k, v in reference.items()}
    clip = load_clip([tiny.paths["l"], tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf"])
    check_flux(clip, tiny.clip_l, hf_t5_holding(decoded))


def test_diffusers_t5_folder(tiny, tmp_path):
    tiny.t5.save_pretrained(tmp_path / "FLUX.1-dev" / "text_encoder_2")
    clip = load_clip([tiny.paths["l"], tmp_path / "FLUX.1-dev" / "text_encoder_2"], clip_type="flux")
    check_flux(clip, tiny.clip_l, tiny.t5)


def test_detection_without_clip_type(tiny):
    assert load_clip([tiny.paths["l"], tiny.paths["t5"]]).clip_type == "flux"
    assert load_clip([tiny.paths["umt5"]]).clip_type == "wan"
    assert load_clip(tiny.paths["sd3"]).clip_type == "sd3"
    sd3 = load_clip([tiny.paths["l"], tiny.paths["g"], tiny.paths["t5"]], clip_type="sd3")
    assert list(sd3.cond_stage_model.encoders) == ["l", "g", "t5xxl"]


def test_single_file_layout_decides_between_sd3_and_flux(tiny, tmp_path):
    """sd3_medium_incl_clips (L + G, no T5) is SD3, not SDXL; a Flux all-in-one file
    (text_encoders.clip_l + t5xxl in the same layout) is Flux."""
    from safetensors.torch import load_file
    full = load_file(str(tiny.paths["sd3"]))
    save_file({k: v for k, v in full.items() if ".t5xxl." not in k}, str(tmp_path / "sd3_incl_clips.safetensors"))
    save_file({k: v for k, v in full.items() if ".clip_g." not in k}, str(tmp_path / "flux1-dev-fp8.safetensors"))
    assert load_clip(tmp_path / "sd3_incl_clips.safetensors").clip_type == "sd3"
    assert load_clip(tmp_path / "flux1-dev-fp8.safetensors").clip_type == "flux"


def test_umt5_tokenizer_given_for_a_file_without_one(tiny):
    given = load_clip([tiny.paths["umt5_bare"]], clip_type="wan",
                      tokenizer_kwargs={"umt5xxl": {"tokenizer": tiny.spiece}})
    own = load_clip([tiny.paths["umt5"]])
    assert given.tokenize(PROMPT) == own.tokenize(PROMPT)
    assert torch.equal(given.encode(PROMPT), own.encode(PROMPT))


@pytest.mark.parametrize("files, clip_type, message", [
    (["t5"], "sd1", r"clip_type 'sd1' \(SD1\) takes CLIP-L, but .*t5xxl_fp32.safetensors holds T5-XXL"),
    (["l", "umt5"], "flux", r"takes CLIP-L \+ T5-XXL \(T5 v1.1\), but .*umt5_xxl.safetensors holds UMT5-XXL"),
    (["umt5"], "sd3", r"holds UMT5-XXL; those files make Wan: pass clip_type='wan'"),
    (["t5"], "wan", r"takes UMT5-XXL, but .* holds T5-XXL"),
    (["umt5_bare"], None, r"umt5_xxl_no_tokenizer.safetensors: this UMT5 text encoder holds no 'spiece_model'"),
    (["t5"], None, r"cannot tell the model type from text encoders \['t5'\].*pass clip_type"),
    (["l"], "flux", r"needs CLIP-L \+ T5-XXL \(T5 v1.1\); missing T5-XXL"),
    (["t5", "sd3"], None, r"a second T5-XXL \(T5 v1.1\) text encoder"),
])
def test_bad_combinations_are_one_line_checkpoint_errors(tiny, files, clip_type, message):
    with pytest.raises(CheckpointError, match=message) as info:
        load_clip([tiny.paths[name] for name in files], clip_type=clip_type)
    assert "\n" not in str(info.value)
