"""Tests for textenc.loading.convert: every layout round-trips exactly; detection reads shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from textenc.loading.checkpoint import load_state_dict
from textenc.loading.convert import (LAYOUTS, SPLIT_QKV, TEXT, VISION, apply_rules, check_keys, to_layout, tower_rules)
from textenc.loading.detect import (convert_text_state_dict, convert_vision_state_dict, detect_model_kind,
                                    detect_text_encoders, detect_vision)
from textenc.errors import CheckpointError

TEXT_LAYOUTS = sorted(name for name, (tower, _, _) in LAYOUTS.items() if tower is TEXT)
VISION_LAYOUTS = sorted(name for name, (tower, _, _) in LAYOUTS.items() if tower is VISION)


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


def _meta_state_dict(model_class: str, config_class: str, **config: int) -> dict[str, torch.Tensor]:
    """Real-size HF state dict on the meta device: shapes only, no memory."""
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = getattr(transformers, model_class)._from_config(getattr(transformers, config_class)(**config))
    return model.state_dict()


# -- round trips ------------------------------------------------------------------


@pytest.mark.parametrize("layout", TEXT_LAYOUTS)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_text_layout_round_trips_through_files(
    tmp_path: Path, tiny_hf_text_state_dict: dict, layout: str, suffix: str
) -> None:
    written = to_layout(tiny_hf_text_state_dict, layout)
    path = tmp_path / f"{layout}{suffix}"
    save_file(written, path) if suffix == ".safetensors" else torch.save(written, path)
    result = convert_text_state_dict(load_state_dict(path), source=str(path))
    assert result.unmatched == () and result.dropped == ()
    _assert_identical(result.state_dict, tiny_hf_text_state_dict)


@pytest.mark.parametrize("layout", VISION_LAYOUTS)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_vision_layout_round_trips_through_files(
    tmp_path: Path, tiny_hf_vision_state_dict: dict, layout: str, suffix: str
) -> None:
    written = to_layout(tiny_hf_vision_state_dict, layout)
    path = tmp_path / f"{layout}{suffix}"
    save_file(written, path) if suffix == ".safetensors" else torch.save(written, path)
    result = convert_vision_state_dict(load_state_dict(path))
    assert result.unmatched == ()
    _assert_identical(result.state_dict, tiny_hf_vision_state_dict)


def test_open_clip_names_and_shapes(tiny_hf_text_state_dict: dict) -> None:
    sd2 = to_layout(tiny_hf_text_state_dict, "sd2")
    prefix = "cond_stage_model.model."
    assert sd2[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
    assert sd2[prefix + "transformer.resblocks.2.mlp.c_fc.weight"].shape == (128, 64)
    assert sd2[prefix + "positional_embedding"].shape == (77, 64)
    assert sd2[prefix + "text_projection"].shape == (64, 48)  # [width, proj] in open_clip.
    assert sd2[prefix + "ln_final.weight"].shape == (64,)


def test_real_flattened_clip_text_model_converts() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=100, max_position_embeddings=16)
    flat = transformers.CLIPTextModel._from_config(config).state_dict()
    assert "embeddings.token_embedding.weight" in flat  # transformers >= 5.6 drops text_model.
    result = convert_text_state_dict(flat)
    assert sorted(result.state_dict) == sorted("text_model." + key for key in flat)


def test_conversion_never_mutates_input(tiny_hf_text_state_dict: dict) -> None:
    sd2 = to_layout(tiny_hf_text_state_dict, "sd2")
    before = {key: value.clone() for key, value in sd2.items()}
    convert_text_state_dict(sd2)
    _assert_identical(sd2, before)


def test_non_weights_dropped_and_unknown_keys_reported(tiny_hf_text_state_dict: dict) -> None:
    sd2 = dict(to_layout(tiny_hf_text_state_dict, "sd2"))
    extras = {"cond_stage_model.model.logit_scale": torch.ones(()),
              "cond_stage_model.model.attn_mask": torch.ones(77, 77),
              "cond_stage_model.model.mystery.weight": torch.ones(1),
              "model.diffusion_model.input_blocks.0.0.weight": torch.ones(1)}
    result = convert_text_state_dict({**sd2, **extras})
    assert sorted(result.dropped) == [
        "cond_stage_model.model.attn_mask", "cond_stage_model.model.logit_scale"]
    assert result.unmatched == ("cond_stage_model.model.mystery.weight",)  # UNet keys are not ours.
    sd1 = to_layout(tiny_hf_text_state_dict, "sd1")
    sd1["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    dropped = convert_text_state_dict(sd1).dropped
    assert dropped == ("cond_stage_model.transformer.text_model.embeddings.position_ids",)


# -- fused qkv semantics ---------------------------------------------------------------


def test_qkv_split_matches_multihead_attention() -> None:
    torch.manual_seed(3)
    width, heads = 64, 4
    attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    torch.nn.init.normal_(attention.in_proj_bias)
    fused = {f"transformer.resblocks.0.attn.{name}": tensor.detach()
             for name, tensor in attention.state_dict().items()}
    hf = apply_rules(fused, tower_rules(TEXT, "open_clip")).state_dict
    layer = "text_model.encoder.layers.0.self_attn."

    def project(name: str, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(x, hf[layer + name + ".weight"], hf[layer + name + ".bias"])
        return out.unflatten(-1, (heads, width // heads)).transpose(1, 2)  # [batch, heads, seq, head_dim]

    x = torch.randn(2, 5, width)
    mixed = torch.nn.functional.scaled_dot_product_attention(
        project("q_proj", x), project("k_proj", x), project("v_proj", x))
    ours = torch.nn.functional.linear(mixed.transpose(1, 2).flatten(2),
                                      hf[layer + "out_proj.weight"], hf[layer + "out_proj.bias"])
    expected, _ = attention(x, x, x, need_weights=False)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_qkv_rows_not_divisible_by_three() -> None:
    bad = {"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(10, 4)}
    with pytest.raises(CheckpointError, match="multiple of 3"):
        apply_rules(bad, tower_rules(TEXT, "open_clip"))
    assert any(rule.op == SPLIT_QKV for rule in tower_rules(VISION, "open_clip"))


# -- detection ----------------------------------------------------------------------------


def test_detect_sdxl_and_pick_encoder(tiny_hf_text_state_dict: dict) -> None:
    sdxl = {**to_layout(tiny_hf_text_state_dict, "sdxl_l"), **to_layout(tiny_hf_text_state_dict, "sdxl_g"),
            "model.diffusion_model.out.2.weight": torch.zeros(1)}
    infos = detect_text_encoders(sdxl)
    assert [(info.name, info.source, info.layout) for info in infos] == [
        ("l", "sdxl", "hf"), ("g", "sdxl", "open_clip")]
    assert infos[1].hidden_size == 64 and infos[1].num_layers == 3 and infos[1].intermediate_size == 128
    assert infos[1].vocab_size == 49408 and infos[1].max_positions == 77 and infos[1].projection_dim == 48
    assert detect_model_kind(sdxl) == "sdxl"
    with pytest.raises(CheckpointError, match="pass encoder="):
        convert_text_state_dict(sdxl, source="x.safetensors")
    _assert_identical(convert_text_state_dict(sdxl, encoder="g").state_dict, tiny_hf_text_state_dict)
    with pytest.raises(CheckpointError, match="'h'"):
        convert_text_state_dict(sdxl, encoder="h")


@pytest.mark.parametrize(("layout", "kind"), [
    ("sd1", "sd1"), ("sd1_legacy", "sd1"), ("sd2", "sd2"), ("sdxl_refiner_g", "sdxl_refiner"),
    ("comfy_l", "standalone_l"), ("comfy_h", "standalone_h"), ("hf", "standalone_custom"),
])
def test_detect_model_kind(tiny_hf_text_state_dict: dict, layout: str, kind: str) -> None:
    assert detect_model_kind(to_layout(tiny_hf_text_state_dict, layout)) == kind


@pytest.mark.parametrize(("width", "layers", "name", "heads"), [
    (768, 12, "l", 12), (1024, 24, "h", 16), (1280, 32, "g", 20)])
def test_standalone_text_name_from_width(width: int, layers: int, name: str, heads: int) -> None:
    hf = _meta_state_dict("CLIPTextModelWithProjection", "CLIPTextConfig", hidden_size=width,
                          intermediate_size=4 * width, num_hidden_layers=layers,
                          num_attention_heads=heads, projection_dim=width)
    (info,) = detect_text_encoders(to_layout(hf, "open_clip"))
    got = (info.name, info.num_heads, info.num_layers, info.intermediate_size)
    assert got == (name, heads, layers, 4 * width)


@pytest.mark.parametrize(("name", "width", "layers", "image_size"), [
    ("vit_l_14", 1024, 24, 224), ("vit_l_14_336", 1024, 24, 336),
    ("vit_h_14", 1280, 32, 224), ("vit_bigg_14", 1664, 48, 224)])
def test_detect_vision_models(name: str, width: int, layers: int, image_size: int) -> None:
    hf = _meta_state_dict("CLIPVisionModelWithProjection", "CLIPVisionConfig", hidden_size=width,
                          intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=16,
                          patch_size=14, image_size=image_size, projection_dim=768)
    for layout in ("hf_vision", "sd21_unclip_visual"):
        info = detect_vision(to_layout(hf, layout))
        assert (info.name, info.num_layers, info.num_heads, info.patch_size) == (name, layers, 16, 14)
        assert info.num_positions == (image_size // 14) ** 2 + 1 and info.projection_dim == 768


def test_not_a_vision_model(tiny_hf_text_state_dict: dict) -> None:
    with pytest.raises(CheckpointError, match="not a CLIP vision model.*text_model"):
        detect_vision(tiny_hf_text_state_dict, source="clip_l.safetensors")
    with pytest.raises(CheckpointError, match="no CLIP text encoder found"):
        convert_text_state_dict({"foo": torch.ones(1)})


def test_full_hf_clip_model_splits_towers(
    tiny_hf_text_state_dict: dict, tiny_hf_vision_state_dict: dict
) -> None:
    both = {**tiny_hf_text_state_dict, **tiny_hf_vision_state_dict, "logit_scale": torch.ones(())}
    text, vision = convert_text_state_dict(both), convert_vision_state_dict(both)
    assert text.unmatched == () and vision.unmatched == ()
    _assert_identical(text.state_dict, tiny_hf_text_state_dict)
    _assert_identical(vision.state_dict, tiny_hf_vision_state_dict)


def test_unknown_layout_name(tiny_hf_text_state_dict: dict) -> None:
    with pytest.raises(CheckpointError, match="known layouts"):
        to_layout(tiny_hf_text_state_dict, "sd3")


# -- strict key checks ---------------------------------------------------------------------


def test_check_keys_reports_everything_in_one_error(tiny_hf_text_state_dict: dict) -> None:
    assert check_keys(tiny_hf_text_state_dict, tiny_hf_text_state_dict).ok
    broken = dict(tiny_hf_text_state_dict)
    del broken["text_model.final_layer_norm.bias"]
    broken["extra.weight"] = torch.zeros(1)
    broken["text_projection.weight"] = torch.zeros(32, 64)
    expected_shapes = {key: tuple(value.shape) for key, value in tiny_hf_text_state_dict.items()}
    with pytest.raises(CheckpointError) as info:
        check_keys(expected_shapes, broken, source="bad.safetensors")
    message = str(info.value)
    for fragment in ("bad.safetensors", "missing: text_model.final_layer_norm.bias",
                     "unexpected: extra.weight", "text_projection.weight: expected [48, 64], got [32, 64]"):
        assert fragment in message
    report = check_keys(expected_shapes, broken, strict=False)
    assert (len(report.missing), len(report.unexpected), len(report.mismatched)) == (1, 1, 1)


# -- parity with open_clip, where it installs ---------------------------------------------------


def test_open_clip_parity() -> None:
    open_clip = pytest.importorskip("open_clip", reason="open_clip needs torchvision, not installed in CI")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    model = open_clip.model.CLIP(
        embed_dim=48,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            width=64, layers=2, head_width=16, patch_size=14, image_size=28),
        text_cfg=open_clip.model.CLIPTextCfg(
            width=64, layers=3, heads=4, context_length=77, vocab_size=49408),
    ).eval()
    state = model.state_dict()
    text_config = transformers.CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                              num_attention_heads=4, projection_dim=48, hidden_act="gelu")
    text = transformers.CLIPTextModelWithProjection._from_config(text_config).eval()
    text.load_state_dict(convert_text_state_dict(state).state_dict, strict=True)
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])
    torch.testing.assert_close(text(input_ids=tokens).text_embeds, model.encode_text(tokens),
                               rtol=1e-5, atol=1e-5)
    vision_config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                                  num_attention_heads=4, image_size=28, patch_size=14,
                                                  projection_dim=48, hidden_act="gelu")
    vision = transformers.CLIPVisionModelWithProjection._from_config(vision_config).eval()
    vision.load_state_dict(convert_vision_state_dict(state).state_dict, strict=True)
    pixels = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(vision(pixel_values=pixels).image_embeds, model.encode_image(pixels),
                               rtol=1e-5, atol=1e-5)
