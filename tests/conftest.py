"""Shared pytest fixtures: tiny random Hugging Face CLIP models as oracles."""

from __future__ import annotations

import pytest
import torch


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch at one thread for a module's tests (use with ``pytestmark``), restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
