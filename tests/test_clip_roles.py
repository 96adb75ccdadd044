"""Which CLIP role a text-encoder file of non-standard width takes (issue 26, left point 3).

ComfyUI's rule (comfy/sd.py ``detect_te_model``; ``SDXLClipModel.load_sd`` and
``SD3ClipModel.load_sd``): a CLIP with ``text_model.encoder.layers.30.mlp.fc1.weight`` is CLIP-G,
one with ``layers.22`` CLIP-H, anything else CLIP-L; the file order plays no part. textenc names
released widths (768 L, 1024 H, 1280 G) as before, non-standard widths by that depth rule, and
gives shallow non-standard files (which ComfyUI would all read as CLIP-L) the family's free CLIP
roles by shape (deeper, then wider, is G), so both file orders load the same model.
"""

from __future__ import annotations

import pytest
import torch

from textenc.errors import CheckpointError
from textenc.sd import load_clip

transformers = pytest.importorskip("transformers")


def _clip_sd(width: int, layers: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                         num_attention_heads=1, projection_dim=width, eos_token_id=49407)
    return {k: v.contiguous() for k, v in
            transformers.CLIPTextModelWithProjection._from_config(config).state_dict().items()}


def _layers_and_widths(clip) -> dict[str, tuple[int, int]]:
    return {role: (encoder.num_layers, encoder.transformer.get_input_embeddings().weight.shape[1])
            for role, encoder in clip.cond_stage_model.encoders.items()}


@pytest.mark.parametrize("clip_type", ["sdxl", "sd3"])
def test_deep_narrow_file_is_g_in_both_orders(clip_type):
    """ComfyUI's rule, not the width: a 31-layer file is G even when it is the narrower one."""
    deep, shallow = ("deep", _clip_sd(32, 31, 1)), ("shallow", _clip_sd(64, 2, 2))
    for order in ([deep, shallow], [shallow, deep]):
        clip = load_clip([], clip_type=clip_type, state_dicts=order)
        assert _layers_and_widths(clip) == {"l": (2, 64), "g": (31, 32)}


@pytest.mark.parametrize("clip_type", ["sdxl", "sd3"])
def test_shallow_files_take_roles_by_shape_in_both_orders(clip_type):
    """Both under 23 layers (ComfyUI reads each as CLIP-L): the deeper, then the wider, is G."""
    for first, second, want in [((64, 2), (96, 4), {"l": (2, 64), "g": (4, 96)}),
                                ((128, 3), (64, 3), {"l": (3, 64), "g": (3, 128)})]:
        files = [("a", _clip_sd(*first, seed=1)), ("b", _clip_sd(*second, seed=2))]
        for order in (files, files[::-1]):
            assert _layers_and_widths(load_clip([], clip_type=clip_type, state_dicts=order)) == want


def test_depth_names_h_as_comfyui():
    clip = load_clip([], state_dicts=[("h", _clip_sd(64, 23, 1))])  # detected, no clip_type
    assert clip.clip_type == "sd2"


def test_two_files_of_one_shape_are_refused():
    files = [("a.safetensors", _clip_sd(64, 2, 1)), ("b.safetensors", _clip_sd(64, 2, 2))]
    with pytest.raises(CheckpointError, match=r"a.safetensors and b.safetensors: two CLIP text encoders of "
                                              r"2 layers and width 64; neither says which is CLIP-L"):
        load_clip([], clip_type="sdxl", state_dicts=files)


def test_a_released_width_keeps_its_name():
    """A 768-wide file is CLIP-L by its width (real files): a shallow custom one beside it is G."""
    clip = load_clip([], clip_type="sdxl", state_dicts=[("g", _clip_sd(64, 2, 1)), ("l", _clip_sd(768, 1, 2))],
                     allow_missing_layers=True)
    assert _layers_and_widths(clip) == {"l": (1, 768), "g": (2, 64)}
