"""PhotoMaker ID encoder: fuse math, trigger-word handling, checkpoint layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from textenc.vision.clip_vision import clip_preprocess
from textenc.errors import CheckpointError, ConfigError, PromptError
from textenc.vision.photomaker import (PhotoMakerIDEncoder, apply_trigger, encode_photomaker, load_photomaker,
                                       photomaker_state_dict)

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "image_size": 28, "patch_size": 14,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32}
EMBED = 48  # 32 + 16


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = PhotoMakerIDEncoder(TINY, projection_2_dim=16, embed_dim=EMBED)
    for parameter in model.parameters():  # init-free layers: fill them ourselves
        parameter.data.normal_(0.0, 0.2)
    return model.eval()


def _mlp(params, prefix, x, residual):
    h = F.layer_norm(x, x.shape[-1:], params[prefix + "layernorm.weight"], params[prefix + "layernorm.bias"])
    h = F.linear(h, params[prefix + "fc1.weight"], params[prefix + "fc1.bias"])
    h = F.linear(F.gelu(h), params[prefix + "fc2.weight"], params[prefix + "fc2.bias"])
    return h + x if residual else h


def _reference_fuse(model, prompt, pooled, mask):
    """Position by position, as written in the PhotoMaker paper's code."""
    params = dict(model.named_parameters())
    ids = torch.cat([pooled @ params["visual_projection.weight"].T,
                     pooled @ params["visual_projection_2.weight"].T], dim=-1)  # (B, N, D)
    out = prompt.clone()
    for b in range(prompt.shape[0]):
        for n, t in enumerate(mask[b].nonzero().flatten().tolist()):
            x = torch.cat([prompt[b, t], ids[b, n]])
            x = _mlp(params, "fuse_module.mlp1.", x, False) + prompt[b, t]
            x = _mlp(params, "fuse_module.mlp2.", x, True)
            out[b, t] = F.layer_norm(x, (EMBED,), params["fuse_module.layer_norm.weight"],
                                     params["fuse_module.layer_norm.bias"])
    return out


def test_forward_matches_direct_computation(encoder):
    pixels = torch.randn(2, 3, 3, 28, 28)
    prompt = torch.randn(2, 10, EMBED)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 4:7] = True   # three images for the first prompt
    mask[1, 2] = True     # only the first image for the second
    with torch.no_grad():
        got = encoder(pixels, prompt, mask)
        pooled = encoder.vision_model(pixels.flatten(0, 1))[2].view(2, 3, -1)
        expected = _reference_fuse(encoder, prompt, pooled, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[~mask], prompt[~mask])


def test_more_class_tokens_than_images_is_an_error(encoder):
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(PromptError, match="only 2 ID image"):
        encoder(torch.randn(1, 2, 3, 28, 28), torch.randn(1, 3, EMBED), mask)


def test_dims_must_add_up():
    with pytest.raises(ConfigError, match="must equal embed_dim"):
        PhotoMakerIDEncoder(TINY, projection_2_dim=10, embed_dim=EMBED, device="meta")


def test_real_layout_key_names():
    keys = set(PhotoMakerIDEncoder(device="meta").state_dict())
    for key in ("vision_model.encoder.layers.23.mlp.fc2.bias", "visual_projection.weight",
                "visual_projection_2.weight", "fuse_module.mlp1.fc1.weight",
                "fuse_module.mlp1.layernorm.weight", "fuse_module.mlp2.fc2.bias",
                "fuse_module.layer_norm.weight"):
        assert key in keys
    shapes = PhotoMakerIDEncoder(device="meta").state_dict()
    assert tuple(shapes["fuse_module.mlp1.fc1.weight"].shape) == (2048, 4096)
    assert tuple(shapes["visual_projection_2.weight"].shape) == (1280, 1024)


# --- trigger word ------------------------------------------------------------

S, E = 100, 101  # start / end(=pad) ids in these hand-written windows


def _window(*ids, length=8):
    tokens = [S, *ids, E]
    return [(t, 1.0) for t in tokens + [E] * (length - len(tokens))]


def _ids(window):
    return [t for t, _ in window]


@pytest.mark.parametrize("ids, trigger, images, expected, position", [
    ((1, 2, 9), [9], 1, [S, 1, 2, E, E, E, E, E], 2),
    ((1, 2, 9, 3), [9], 2, [S, 1, 2, 2, 3, E, E, E], 2),
    ((1, 2, 8, 9, 3), [8, 9], 3, [S, 1, 2, 2, 2, 3, E, E], 2),
    ((5, 9, 1, 2, 3, 4), [9], 4, [S, 5, 5, 5, 5, 1, 2, E], 1),  # cut before the last entry
])
def test_apply_trigger_hand_derived(ids, trigger, images, expected, position):
    new, where = apply_trigger(_window(*ids), trigger, num_images=images, special=frozenset({S, E}))
    assert (_ids(new), where) == (expected, position)


def test_apply_trigger_absent_and_without_class_word():
    assert apply_trigger(_window(1, 2), [9], num_images=1) is None
    assert apply_trigger(_window(1, 8), [8, 9], num_images=1) is None  # partial run
    with pytest.raises(PromptError, match="class word"):
        apply_trigger(_window(9, 1), [9], num_images=1, special=frozenset({S, E}))


class FakeClip:
    """Word-level tokenizer (ids from a table) and a lookup-table text encoder."""

    vocab = {"a": 1, "photo": 2, "of": 3, "man": 4, "photomaker": 5, "img": 6}

    def __init__(self):
        self.table = torch.randn(128, EMBED, generator=torch.Generator().manual_seed(5))
        self.seen = None

    def tokenize(self, text, return_word_ids=False):
        ids = [self.vocab[w] for w in text.split()]
        return {"g": [_window(*ids, length=10)], "l": [_window(*ids, length=10)]}

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.seen = tokens
        ids = torch.tensor([t for window in tokens["g"] for t, _ in window])
        return self.table[ids][None], torch.ones(1, 4)


def test_encode_photomaker_fuses_class_word(encoder):
    clip = FakeClip()
    images = torch.rand(2, 40, 30, 3)
    out = encode_photomaker(encoder, clip, "a photo of a man photomaker", images)
    assert _ids(clip.seen["g"][0]) == [S, 1, 2, 3, 1, 4, 4, E, E, E]
    cond, extras = out[0]
    assert extras["pooled_output"].shape == (1, 4)
    plain = clip.table[torch.tensor(_ids(clip.seen["g"][0]))][None]
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 5:7] = True
    config = encoder.config
    pixels = clip_preprocess(images, 28, config.image_mean, config.image_std)
    with torch.no_grad():
        expected = encoder(pixels[None], plain, mask)
    torch.testing.assert_close(cond, expected)
    assert torch.equal(cond[0, :5], plain[0, :5])


def test_encode_photomaker_without_trigger(encoder):
    with pytest.raises(PromptError, match="'photomaker' is not in the prompt"):
        encode_photomaker(encoder, FakeClip(), "a photo of a man", torch.rand(1, 28, 28, 3))
    with pytest.raises(PromptError, match="'img' is not in the prompt"):
        encode_photomaker(encoder, FakeClip(), "a man photomaker", torch.rand(1, 28, 28, 3),
                          trigger_word="img")


# --- checkpoint layout -------------------------------------------------------

def test_state_dict_nested_and_flat():
    weight = torch.zeros(2)
    nested = {"id_encoder": {"fuse_module.layer_norm.weight": weight}, "lora_weights": {"x": weight}}
    flat = {"id_encoder.fuse_module.layer_norm.weight": weight, "lora_weights.x": weight}
    assert photomaker_state_dict(nested) == photomaker_state_dict(flat) == {
        "fuse_module.layer_norm.weight": weight}
    with pytest.raises(CheckpointError, match="not a PhotoMaker checkpoint"):
        photomaker_state_dict({"model.x": weight})


def test_load_photomaker_is_strict(tmp_path):
    path = tmp_path / "photomaker.safetensors"
    save_file({"id_encoder.fuse_module.layer_norm.weight": torch.zeros(7),
               "lora_weights.unet.x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError) as info:
        load_photomaker(path)
    message = str(info.value)
    assert "missing keys" in message and "expected (2048,), got (7,)" in message
    assert "lora" not in message


def test_load_photomaker_reads_nested_bin_safely(tmp_path):
    path = tmp_path / "photomaker-v1.bin"
    torch.save({"id_encoder": {"visual_projection_2.weight": torch.zeros(1280, 1024)},
                "lora_weights": {"unet.x": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="missing keys") as info:
        load_photomaker(path)
    assert "visual_projection_2.weight" not in str(info.value)


def test_load_photomaker_refuses_non_tensors_inside_nested_bin(tmp_path):
    path = tmp_path / "photomaker-v1.bin"
    torch.save({"id_encoder": {"fuse_module.layer_norm.weight": torch.zeros(2048), "step": 3},
                "lora_weights": {"unet.x": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"'id_encoder\.step' is a int, not a tensor"):
        load_photomaker(path)
