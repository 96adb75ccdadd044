"""textenc.nn.config: bundled configs against published values, and strict loading."""

from __future__ import annotations

import dataclasses
import doctest
import json

import pytest
import transformers

from textenc.nn import config as config_module
from textenc.nn.config import (CLIPTextConfig, CLIPVisionConfig, bundled_config_names, load_text_config,
                               load_vision_config)
from textenc.errors import ConfigError

# Hand-typed from the published model cards / configs: OpenAI CLIP ViT-L/14
# (openai/clip-vit-large-patch14, -336), OpenCLIP ViT-H-14 and ViT-bigG-14
# (open_clip model_configs/ViT-H-14.json, ViT-bigG-14.json).
# (width, mlp width, layers, heads, activation, projection)
PUBLISHED_TEXT = {
    "sd1_clip_config": (768, 3072, 12, 12, "quick_gelu", 768),     # CLIP ViT-L/14
    "sd2_clip_config": (1024, 4096, 24, 16, "gelu", 1024),         # OpenCLIP ViT-H/14
    "clip_g": (1280, 5120, 32, 20, "gelu", 1280),                  # OpenCLIP ViT-bigG/14
}
# (width, mlp width, layers, heads, activation, projection, image size, patch)
PUBLISHED_VISION = {
    "clip_vision_config_vitl": (1024, 4096, 24, 16, "quick_gelu", 768, 224, 14),
    "clip_vision_config_vitl_336": (1024, 4096, 24, 16, "quick_gelu", 768, 336, 14),
    "clip_vision_config_h": (1280, 5120, 32, 16, "gelu", 1024, 224, 14),
    "clip_vision_config_g": (1664, 8192, 48, 16, "gelu", 1280, 224, 14),
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


#: T5 encoders (textenc.nn.t5_config; their shapes are checked in tests/test_t5_config.py).
PUBLISHED_T5 = ("t5_xxl", "umt5_xxl")


def test_bundled_names():
    assert bundled_config_names() == sorted([*PUBLISHED_TEXT, *PUBLISHED_VISION, *PUBLISHED_T5])


@pytest.mark.parametrize("name", list(PUBLISHED_TEXT))
def test_text_configs_match_published(name):
    cfg = load_text_config(name)
    got = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
           cfg.num_attention_heads, cfg.hidden_act, cfg.projection_dim)
    assert got == PUBLISHED_TEXT[name]
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.layer_norm_eps) == (49408, 77, 1e-5)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (49406, 49407)


@pytest.mark.parametrize("name", list(PUBLISHED_VISION))
def test_vision_configs_match_published(name):
    cfg = load_vision_config(name)
    got = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
           cfg.num_attention_heads, cfg.hidden_act, cfg.projection_dim,
           cfg.image_size, cfg.patch_size)
    assert got == PUBLISHED_VISION[name]
    assert (cfg.num_channels, cfg.layer_norm_eps) == (3, 1e-5)
    assert cfg.image_mean == OPENAI_MEAN and cfg.image_std == OPENAI_STD
    assert cfg.num_positions == (cfg.image_size // 14) ** 2 + 1


def test_configs_are_frozen():
    cfg = load_text_config("sd1_clip_config")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 1  # type: ignore[misc]


def test_config_instance_and_dict_pass_through():
    cfg = load_text_config("sd2_clip_config")
    assert load_text_config(cfg) is cfg
    assert load_text_config(dataclasses.asdict(cfg)) == cfg


def write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def text_values():
    return dataclasses.asdict(load_text_config("sd1_clip_config"))


def vision_values():
    return dataclasses.asdict(load_vision_config("clip_vision_config_vitl"))


def assert_config_error(loader, path, *words):
    with pytest.raises(ConfigError) as info:
        loader(path)
    message = str(info.value)
    for word in (str(path), *words):
        assert word in message, (word, message)


def test_unknown_key(tmp_path):
    path = write(tmp_path, {**text_values(), "hidden_sise": 768})
    assert_config_error(load_text_config, path, "hidden_sise")


def test_missing_key(tmp_path):
    values = text_values()
    del values["num_attention_heads"]
    assert_config_error(load_text_config, write(tmp_path, values), "num_attention_heads")


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "768"), ("hidden_size", 768.0), ("hidden_size", True), ("hidden_size", 0),
    ("num_hidden_layers", -1), ("num_attention_heads", 7),  # 768 % 7 != 0
    ("hidden_act", "relu"), ("layer_norm_eps", -1e-5), ("layer_norm_eps", "1e-5"),
    ("layer_norm_eps", True), ("vocab_size", 0), ("eos_token_id", "49407"),
    ("projection_dim", None),
])
def test_bad_text_value(tmp_path, key, value):
    path = write(tmp_path, {**text_values(), key: value})
    assert_config_error(load_text_config, path, key)


@pytest.mark.parametrize("key, value", [
    ("patch_size", 0), ("patch_size", 15), ("image_size", -224), ("image_size", 0),
    ("num_channels", 0), ("image_mean", [0.5, 0.5]), ("image_mean", "abc"),
    ("image_std", [0.5, "x", 0.5]), ("hidden_act", "silu"),
])
def test_bad_vision_value(tmp_path, key, value):
    path = write(tmp_path, {**vision_values(), key: value})
    assert_config_error(load_vision_config, path, key)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "", "\xff\xfe"])
def test_not_a_json_object(tmp_path, text):
    path = tmp_path / "config.json"
    if text == "\xff\xfe":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(text)
    assert_config_error(load_text_config, path)


def test_nonexistent_path(tmp_path):
    assert_config_error(load_text_config, tmp_path / "missing.json")
    assert_config_error(load_vision_config, tmp_path / "missing.json")


def test_directory_is_not_a_config(tmp_path):
    assert_config_error(load_text_config, tmp_path)


def test_dict_source_is_named():
    with pytest.raises(ConfigError, match="hidden_sise"):
        load_text_config({**text_values(), "hidden_sise": 1})


def test_transformers_saved_configs_load(tmp_path):
    hf_text = transformers.CLIPTextConfig(hidden_size=256, intermediate_size=1024,
                                          num_hidden_layers=3, num_attention_heads=4,
                                          projection_dim=128, hidden_act="gelu")
    hf_text.save_pretrained(tmp_path / "text")
    cfg = load_text_config(tmp_path / "text" / "config.json")
    assert isinstance(cfg, CLIPTextConfig)
    for field in dataclasses.fields(CLIPTextConfig):
        assert getattr(cfg, field.name) == getattr(hf_text, field.name), field.name

    hf_vision = transformers.CLIPVisionConfig(hidden_size=128, intermediate_size=512,
                                              num_hidden_layers=2, num_attention_heads=2,
                                              image_size=56, patch_size=14, projection_dim=64)
    hf_vision.save_pretrained(tmp_path / "vision")
    vision = load_vision_config(tmp_path / "vision" / "config.json")
    assert isinstance(vision, CLIPVisionConfig)
    for field in dataclasses.fields(CLIPVisionConfig):
        if field.name not in ("image_mean", "image_std"):  # preprocessor, not model config
            assert getattr(vision, field.name) == getattr(hf_vision, field.name), field.name


def test_doctests():
    result = doctest.testmod(config_module, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
