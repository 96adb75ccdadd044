"""Shared pytest fixtures: tiny random Hugging Face CLIP models as oracles, and the
tiny SD1 text encoder file the encode-dataset modules encode with (built by
:mod:`dataset_fixtures`, which holds their other shared helpers).

Also the Hypothesis profile, chosen with ``HYPOTHESIS_PROFILE`` (:mod:`hypothesis_profiles`:
``ci``, the default, or ``dev`` for fewer examples), loaded here before any test module.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import hypothesis_profiles
from dataset_fixtures import write_tiny_sd1

hypothesis_profiles.load()


@pytest.fixture(scope="session")
def tiny_hf_text_state_dict() -> dict[str, torch.Tensor]:
    """HF ``CLIPTextModelWithProjection`` state dict: width 64, 3 layers, 4 heads."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, vocab_size=49408, max_position_embeddings=77,
        projection_dim=48, hidden_act="gelu",
    )
    model = transformers.CLIPTextModelWithProjection._from_config(config, attn_implementation="sdpa")
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.fixture(scope="session")
def tiny_hf_vision_state_dict() -> dict[str, torch.Tensor]:
    """HF ``CLIPVisionModelWithProjection`` state dict: width 64, 2 layers, 28px / patch 14."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, image_size=28, patch_size=14, projection_dim=48,
    )
    model = transformers.CLIPVisionModelWithProjection._from_config(config, attn_implementation="sdpa")
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """torch at 1, then 2 threads (bits depend on the count), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pack():
    """Import ``nodes/`` the way ComfyUI imports a custom node folder, under another name
    (removed from ``sys.modules`` after the module's tests)."""
    name = "textenc_nodes_host_test"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "nodes" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch at one thread for a module's tests (use with ``pytestmark``), restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random CLIP-L-shaped text encoder (width 128, 2 heads of 64, 2 layers) in SD1
    layout; the same weights as a diffusers folder at ``tiny_model.parent / "diffusers"``.
    Built once: the dataset modules only read it."""
    return write_tiny_sd1(tmp_path_factory.mktemp("model"), width=128, diffusers=True)
