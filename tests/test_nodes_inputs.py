"""Every node input: a wrong value raises a typed textenc error naming the node and the input.

Each case changes one input of a valid call. The ranges are the ones each node
declares in ``INPUT_TYPES`` (ComfyUI's own executor refuses values outside them
the same way); the layer range is the text encoder's depth.
"""

from __future__ import annotations

import math

import pytest
import torch

from test_nodes import TINY_VISION, hf_text, hf_vision, models, models_dir, run  # noqa: F401
from textenc.errors import (CheckpointError, ConditioningError, EncodeError, ImageError, LayerError, PromptError,
                            TextencError)


@pytest.fixture()
def valid(pack, models_dir):  # noqa: F811
    """One valid input set per node, built from the tiny models."""
    from textenc.vision.photomaker import PhotoMakerIDEncoder

    (clip,) = run(pack, "CLIPLoader", clip_name="tiny_sd1.safetensors", type="sd1")
    (vision,) = run(pack, "CLIPVisionLoader", clip_name="tiny_vision.safetensors")
    image = torch.rand(1, 40, 40, 3, generator=torch.Generator().manual_seed(0))
    (seen,) = run(pack, "CLIPVisionEncode", clip_vision=vision, image=image, crop="center")
    (cond,) = run(pack, "CLIPTextEncode", clip=clip, text="a cat")
    torch.manual_seed(0)
    photomaker = PhotoMakerIDEncoder({**TINY_VISION, "image_size": 28}, projection_2_dim=96, embed_dim=128)
    for parameter in photomaker.parameters():
        parameter.data.normal_(0.0, 0.2)
    sizes = dict(width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024, target_height=1024)
    return {
        "CLIPLoader": dict(clip_name="tiny_sd1.safetensors", type="sd1", device="cpu"),
        "CheckpointCLIPLoaderTextenc": dict(ckpt_name="tiny_full.safetensors", device="cpu"),
        "DualCLIPLoader": dict(clip_name1="tiny_sd1.safetensors", clip_name2="tiny_sd1.safetensors",
                               type="sdxl", device="cpu"),
        "TripleCLIPLoader": dict(clip_name1="tiny_sd1.safetensors", clip_name2="tiny_sd1.safetensors",
                                 clip_name3="tiny_sd1.safetensors", device="cpu"),
        "CLIPTextEncodeSD3": dict(clip=clip, clip_l="a", clip_g="b", t5xxl="c", empty_padding="none"),
        "CLIPTextEncodeFlux": dict(clip=clip, clip_l="a", t5xxl="c", guidance=3.5),
        "FluxGuidance": dict(conditioning=cond, guidance=3.5),
        "CLIPSetLastLayer": dict(clip=clip, stop_at_clip_layer=-1),
        "CLIPTextEncode": dict(clip=clip, text="a cat"),
        "CLIPTextEncodeSDXL": dict(clip=clip, **sizes, text_g="a", text_l="b"),
        "CLIPTextEncodeAdvancedTextenc": dict(clip=clip, text="a cat", token_normalization="none",
                                              weight_interpretation="auto", weight_convention="comfy",
                                              square_brackets=False, break_keyword=False, syntax="comfy"),
        "CLIPVisionLoader": dict(clip_name="tiny_vision.safetensors"),
        "CLIPVisionEncode": dict(clip_vision=vision, image=image, crop="center"),
        "unCLIPConditioning": dict(conditioning=cond, clip_vision_output=seen, strength=1.0,
                                   noise_augmentation=0.0),
        "PhotoMakerLoader": dict(photomaker_model_name="x.safetensors"),
        "PhotoMakerEncode": dict(photomaker=photomaker.eval(), image=image, clip=clip,
                                 text="photo of a man photomaker"),
        "ConditioningConcat": dict(conditioning_to=cond, conditioning_from=cond),
        "ConditioningCombine": dict(conditioning_1=cond, conditioning_2=cond),
        "ConditioningAverage": dict(conditioning_to=cond, conditioning_from=cond, conditioning_to_strength=0.5),
        "ConditioningZeroOut": dict(conditioning=cond),
    }


INF_COND = [[torch.full((1, 77, 128), math.inf), {}]]
FLAT_COND = [[torch.zeros(77, 128), {}]]
NAN_IMAGE = torch.full((1, 8, 8, 3), math.nan)

# (node, input, bad value, error class, message fragment)
CASES = [
    ("CLIPLoader", "clip_name", 5, CheckpointError, "CLIPLoader: clip_name must be a string"),
    ("CLIPLoader", "clip_name", "../tiny_sd1.safetensors", CheckpointError, "CLIPLoader: clip_name .*climbs out"),
    ("CLIPLoader", "type", "mochi", CheckpointError, "CLIPLoader: type 'mochi' is not one of"),
    ("CLIPLoader", "device", "gpu", TextencError, "CLIPLoader: device 'gpu' is not one of"),
    ("CheckpointCLIPLoaderTextenc", "ckpt_name", 5, CheckpointError,
     "CheckpointCLIPLoaderTextenc: ckpt_name must be a string"),
    ("CheckpointCLIPLoaderTextenc", "ckpt_name", "../checkpoints/x.safetensors", CheckpointError,
     "CheckpointCLIPLoaderTextenc: ckpt_name .*climbs out"),
    ("CheckpointCLIPLoaderTextenc", "device", "gpu", TextencError,
     "CheckpointCLIPLoaderTextenc: device 'gpu' is not one of"),
    ("DualCLIPLoader", "clip_name1", None, CheckpointError, "clip_name1 must be a string"),
    ("DualCLIPLoader", "clip_name2", "/etc/passwd", CheckpointError, "clip_name2 .*relative"),
    ("DualCLIPLoader", "type", "sd1", CheckpointError, "DualCLIPLoader: type 'sd1'"),
    ("DualCLIPLoader", "device", 3, TextencError, "DualCLIPLoader: device 3 is not one of"),
    ("TripleCLIPLoader", "clip_name1", None, CheckpointError, "TripleCLIPLoader: clip_name1 must be a string"),
    ("TripleCLIPLoader", "clip_name2", "../x.safetensors", CheckpointError, "clip_name2 .*climbs out"),
    ("TripleCLIPLoader", "clip_name3", "/etc/passwd", CheckpointError, "clip_name3 .*relative"),
    ("TripleCLIPLoader", "device", "gpu", TextencError, "TripleCLIPLoader: device 'gpu' is not one of"),
    ("CLIPTextEncodeSD3", "clip", "x", CheckpointError, "CLIPTextEncodeSD3: clip must be a CLIP"),
    ("CLIPTextEncodeSD3", "clip_l", None, PromptError, "CLIPTextEncodeSD3: clip_l must be a string"),
    ("CLIPTextEncodeSD3", "clip_g", 3, PromptError, "CLIPTextEncodeSD3: clip_g must be a string"),
    ("CLIPTextEncodeSD3", "t5xxl", b"x", PromptError, "CLIPTextEncodeSD3: t5xxl must be a string"),
    ("CLIPTextEncodeSD3", "empty_padding", "zeros", PromptError, "empty_padding 'zeros' is not one of"),
    ("CLIPTextEncodeFlux", "clip", None, CheckpointError, "CLIPTextEncodeFlux: clip input is None"),
    ("CLIPTextEncodeFlux", "clip_l", None, PromptError, "CLIPTextEncodeFlux: clip_l must be a string"),
    ("CLIPTextEncodeFlux", "t5xxl", 1, PromptError, "CLIPTextEncodeFlux: t5xxl must be a string"),
    ("CLIPTextEncodeFlux", "guidance", 101.0, ConditioningError, r"guidance must be in \[0.0, 100.0\]"),
    ("FluxGuidance", "conditioning", INF_COND, ConditioningError, "FluxGuidance: conditioning entry 0"),
    ("FluxGuidance", "guidance", math.nan, ConditioningError, "FluxGuidance: guidance must be a finite number"),
    ("CLIPSetLastLayer", "clip", "not a clip", CheckpointError, "clip must be a CLIP from a textenc loader"),
    ("CLIPSetLastLayer", "clip", None, CheckpointError, "CLIPSetLastLayer: clip input is None"),
    ("CLIPSetLastLayer", "stop_at_clip_layer", "x", LayerError, "stop_at_clip_layer must be an integer, got 'x'"),
    ("CLIPSetLastLayer", "stop_at_clip_layer", 1.5, LayerError, "stop_at_clip_layer must be an integer"),
    ("CLIPSetLastLayer", "stop_at_clip_layer", True, LayerError, "stop_at_clip_layer must be an integer"),
    ("CLIPSetLastLayer", "stop_at_clip_layer", 0, LayerError, r"stop_at_clip_layer must be in \[-24, -1\]"),
    ("CLIPSetLastLayer", "stop_at_clip_layer", -25, LayerError, r"must be in \[-24, -1\], got -25"),
    ("CLIPSetLastLayer", "stop_at_clip_layer", -3, LayerError,
     r"stop_at_clip_layer=-3: layer -3 is out of range for a 2-layer text encoder: valid layers are -2\.\.-1"),
    ("CLIPTextEncode", "clip", "not a clip", CheckpointError, "CLIPTextEncode: clip must be a CLIP"),
    ("CLIPTextEncode", "text", None, PromptError, "CLIPTextEncode: text must be a string, got NoneType"),
    ("CLIPTextEncodeSDXL", "clip", object(), CheckpointError, "CLIPTextEncodeSDXL: clip must be a CLIP"),
    ("CLIPTextEncodeSDXL", "width", -1, TextencError, r"width must be in \[0, 16384\], got -1"),
    ("CLIPTextEncodeSDXL", "height", "x", TextencError, "height must be an integer"),
    ("CLIPTextEncodeSDXL", "crop_w", 1.5, TextencError, "crop_w must be an integer"),
    ("CLIPTextEncodeSDXL", "crop_h", 10**9, TextencError, "crop_h must be in"),
    ("CLIPTextEncodeSDXL", "target_width", None, TextencError, "target_width must be an integer"),
    ("CLIPTextEncodeSDXL", "target_height", True, TextencError, "target_height must be an integer"),
    ("CLIPTextEncodeSDXL", "text_g", None, PromptError, "text_g must be a string"),
    ("CLIPTextEncodeSDXL", "text_l", 3, PromptError, "text_l must be a string"),
    ("CLIPTextEncodeAdvancedTextenc", "clip", None, CheckpointError, "clip input is None"),
    ("CLIPTextEncodeAdvancedTextenc", "text", b"a cat", PromptError, "text must be a string"),
    ("CLIPTextEncodeAdvancedTextenc", "token_normalization", "x", PromptError, "token_normalization 'x'"),
    ("CLIPTextEncodeAdvancedTextenc", "weight_interpretation", "x", PromptError, "weight_interpretation 'x'"),
    ("CLIPTextEncodeAdvancedTextenc", "weight_convention", "x", PromptError, "weight_convention 'x'"),
    ("CLIPTextEncodeAdvancedTextenc", "square_brackets", "yes", PromptError, "square_brackets must be true"),
    ("CLIPTextEncodeAdvancedTextenc", "break_keyword", 1, PromptError, "break_keyword must be true or false"),
    ("CLIPTextEncodeAdvancedTextenc", "syntax", "bogus", PromptError, "syntax 'bogus' is not one of"),
    ("CLIPTextEncodeAdvancedTextenc", "fast_pooled", "yes", PromptError, "fast_pooled must be true or false"),
    ("CLIPTextEncodeAdvancedTextenc", "truncate_long_prompts", "no", PromptError,
     "truncate_long_prompts must be true or false"),
    ("CLIPTextEncodeAdvancedTextenc", "truncate_long_prompts", False, PromptError,
     "CLIPTextEncodeAdvancedTextenc: truncate_long_prompts=False is an option of syntax='compel' only; "
     "syntax='comfy'"),
    ("CLIPVisionLoader", "clip_name", None, CheckpointError, "CLIPVisionLoader: clip_name must be a string"),
    ("CLIPVisionLoader", "clip_name", "/etc/passwd", CheckpointError, "CLIPVisionLoader: clip_name .*relative"),
    ("CLIPVisionEncode", "clip_vision", None, CheckpointError, "CLIPVisionEncode: clip_vision input is None"),
    ("CLIPVisionEncode", "clip_vision", "x", CheckpointError, "clip_vision must be a CLIP_VISION"),
    ("CLIPVisionEncode", "image", None, ImageError, "CLIPVisionEncode: image must be a float IMAGE"),
    ("CLIPVisionEncode", "image", torch.rand(8, 8, 3), ImageError, r"image must be .* got \(8, 8, 3\)"),
    ("CLIPVisionEncode", "image", NAN_IMAGE, ImageError, "image holds inf or nan"),
    ("CLIPVisionEncode", "crop", "zoom", TextencError, "CLIPVisionEncode: crop 'zoom' is not one of"),
    ("unCLIPConditioning", "conditioning", "x", ConditioningError, "unCLIPConditioning: conditioning is malformed"),
    ("unCLIPConditioning", "conditioning", INF_COND, ConditioningError, "conditioning entry 0 has a non-finite cond"),
    ("unCLIPConditioning", "clip_vision_output", None, ConditioningError,
     "clip_vision_output must be the output of CLIPVisionEncode"),
    ("unCLIPConditioning", "strength", 1e300, ConditioningError, r"strength must be in \[-10.0, 10.0\]"),
    ("unCLIPConditioning", "strength", math.nan, ConditioningError, "strength must be a finite number"),
    ("unCLIPConditioning", "noise_augmentation", 2.0, ConditioningError, r"noise_augmentation must be in \[0.0, 1.0\]"),
    ("unCLIPConditioning", "noise_augmentation", "x", ConditioningError, "noise_augmentation must be a finite"),
    ("PhotoMakerLoader", "photomaker_model_name", None, CheckpointError, "photomaker_model_name must be a string"),
    ("PhotoMakerLoader", "photomaker_model_name", "../x.bin", CheckpointError, "photomaker_model_name .*climbs"),
    ("PhotoMakerEncode", "photomaker", None, CheckpointError, "PhotoMakerEncode: photomaker input is None"),
    ("PhotoMakerEncode", "image", "x", ImageError, "PhotoMakerEncode: image must be"),
    ("PhotoMakerEncode", "clip", None, CheckpointError, "PhotoMakerEncode: clip input is None"),
    ("PhotoMakerEncode", "text", None, PromptError, "PhotoMakerEncode: text must be a string"),
    ("ConditioningConcat", "conditioning_to", None, ConditioningError, "conditioning_to is malformed"),
    ("ConditioningConcat", "conditioning_from", FLAT_COND, ConditioningError, "conditioning_from is malformed"),
    ("ConditioningCombine", "conditioning_1", "x", ConditioningError, "conditioning_1 is malformed"),
    ("ConditioningCombine", "conditioning_2", INF_COND, ConditioningError, "conditioning_2 entry 0 has a non-finite"),
    ("ConditioningAverage", "conditioning_to", INF_COND, ConditioningError, "conditioning_to entry 0 has a non-finite"),
    ("ConditioningAverage", "conditioning_from", [], ConditioningError, "conditioning_from is malformed"),
    ("ConditioningAverage", "conditioning_to_strength", 1e300, ConditioningError,
     r"ConditioningAverage: conditioning_to_strength must be in \[0.0, 1.0\], got 1e\+300"),
    ("ConditioningAverage", "conditioning_to_strength", "x", ConditioningError, "must be a finite number"),
    ("ConditioningAverage", "conditioning_to_strength", -0.5, ConditioningError, "must be in"),
    ("ConditioningAverage", "conditioning_to_strength", math.inf, ConditioningError, "must be a finite number"),
    ("ConditioningZeroOut", "conditioning", None, ConditioningError, "ConditioningZeroOut: conditioning is malformed"),
]


@pytest.mark.parametrize("node_name,input_name,value,error,message", CASES,
                         ids=[f"{c[0]}.{c[1]}={c[2]!r:.20}" for c in CASES])
def test_bad_input_raises_typed_error_naming_it(pack, valid, node_name, input_name, value, error,  # noqa: F811
                                                message):
    inputs = {**valid[node_name], input_name: value}
    with pytest.raises(error, match=message):
        run(pack, node_name, **inputs)


def test_every_input_of_every_node_has_a_case(pack):  # noqa: F811
    covered = {(node, name) for node, name, *_ in CASES}
    for node_name, cls in pack.NODE_CLASS_MAPPINGS.items():
        if node_name.startswith(pack.ALIAS_PREFIX):
            continue
        types = cls.INPUT_TYPES()
        for name in {**types["required"], **types.get("optional", {})}:
            assert (node_name, name) in covered, f"{node_name}.{name} has no bad-input case"
        assert hasattr(getattr(cls, cls.FUNCTION), "__wrapped__"), f"{node_name} is not @checked"


def test_valid_inputs_still_run(pack, valid):  # noqa: F811
    for name in ("CLIPSetLastLayer", "CLIPTextEncode", "CLIPTextEncodeAdvancedTextenc", "CLIPVisionEncode",
                 "unCLIPConditioning", "ConditioningConcat", "ConditioningCombine", "ConditioningAverage",
                 "ConditioningZeroOut", "FluxGuidance"):
        assert run(pack, name, **valid[name])
    (mixed,) = run(pack, "ConditioningAverage", **{**valid["ConditioningAverage"], "conditioning_to_strength": 1})
    assert torch.isfinite(mixed[0][0]).all()  # ints are valid FLOAT widget values


def test_non_finite_conditioning_output_is_an_error(pack, models_dir):  # noqa: F811
    """A text encoder whose output overflows: the encode node refuses to hand on inf."""
    (clip,) = run(pack, "CLIPLoader", clip_name="tiny_sd1.safetensors", type="sd1")  # a model of its own
    norm = clip.cond_stage_model.encoder.transformer.text_model.final_layer_norm
    norm.weight.data = torch.full_like(norm.weight, torch.finfo(torch.float32).max)
    clip.cond_stage_model.encoder.clear_caches()
    # The library's own output check (EncodeError) fires before the node's: either way
    # no inf reaches the graph.
    with pytest.raises(EncodeError, match=r"text encoder returned NaN or infinite values"):
        run(pack, "CLIPTextEncode", clip=clip, text="a cat")


def test_set_last_layer_accepts_the_whole_depth(pack, valid, hf_text):  # noqa: F811
    clip = valid["CLIPSetLastLayer"]["clip"]
    for layer in (-1, -2):
        (skipped,) = run(pack, "CLIPSetLastLayer", clip=clip, stop_at_clip_layer=layer)
        assert skipped.layer_idx == layer


def test_advanced_encode_syntax(pack, valid):  # noqa: F811
    base = valid["CLIPTextEncodeAdvancedTextenc"]
    clip = base["clip"]
    text = "a [cat] on a (mat:1.3)"
    (a1111,) = run(pack, "CLIPTextEncodeAdvancedTextenc", **{**base, "text": text, "syntax": "a1111"})
    # A1111's reading: [x] is weight / 1.1 (its docs), and its weight mode by default (auto).
    expected = clip.encode_from_tokens(clip.tokenize("a (cat:0.9090909090909091) on a (mat:1.3)"),
                                       options={"weight_mode": "a1111"})
    assert torch.equal(a1111[0][0], expected)
    (explicit,) = run(pack, "CLIPTextEncodeAdvancedTextenc",
                      **{**base, "text": text, "syntax": "a1111", "weight_interpretation": "a1111"})
    assert torch.equal(explicit[0][0], a1111[0][0])
    (comfy_weights,) = run(pack, "CLIPTextEncodeAdvancedTextenc",
                           **{**base, "text": text, "syntax": "a1111", "weight_interpretation": "comfy"})
    assert not torch.equal(comfy_weights[0][0], a1111[0][0])
    (comfy,) = run(pack, "CLIPTextEncodeAdvancedTextenc", **{**base, "text": text})
    assert torch.equal(comfy[0][0], run(pack, "CLIPTextEncode", clip=clip, text=text)[0][0][0])
    with pytest.raises(PromptError, match="square_brackets=True refines syntax=.comfy. only; syntax=.a1111."):
        run(pack, "CLIPTextEncodeAdvancedTextenc", **{**base, "syntax": "a1111", "square_brackets": True})
