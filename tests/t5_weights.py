"""Test helpers: tiny random T5 v1.1 / UMT5 state dicts in the Hugging Face key layout,
and transformers' encoders holding the same weights (the oracle)."""

from __future__ import annotations

import math

import torch

from textenc.nn.t5 import T5

#: The tiny shape the T5 tests use: d_model 64, d_ff 160, 4 heads of 16, 3 layers.
TINY = {"vocab_size": 128, "d_model": 64, "d_kv": 16, "d_ff": 160, "num_layers": 3, "num_heads": 4}


def random_t5_state_dict(model_type: str = "t5", seed: int = 0, **shape) -> dict[str, torch.Tensor]:
    """Random fp32 weights for every key of a T5 (``model_type`` "t5" or "umt5") of ``TINY`` shape
    (overridden by ``shape``). Norm weights near 1, embeddings and position biases O(1),
    Linear weights fan-in scaled, so activations stay O(1) and the bias matters."""
    config = {**TINY, **shape, "model_type": model_type}
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in T5(config, device="meta").state_dict().items():
        if key.endswith("layer_norm.weight"):
            out[key] = 1.0 + 0.2 * torch.randn(value.shape, generator=generator)
        elif key == "shared.weight" or "relative_attention_bias" in key:
            out[key] = torch.randn(value.shape, generator=generator)
        else:
            out[key] = torch.randn(value.shape, generator=generator) / math.sqrt(value.shape[1])
    return out


def hf_encoder(state_dict: dict[str, torch.Tensor], model_type: str = "t5", implementation: str = "eager",
               **shape):
    """transformers' ``T5EncoderModel`` / ``UMT5EncoderModel`` (fp32, eval) holding ``state_dict``."""
    import transformers

    config_class, model_class = ((transformers.T5Config, transformers.T5EncoderModel) if model_type == "t5"
                                 else (transformers.UMT5Config, transformers.UMT5EncoderModel))
    size = {**TINY, **shape}
    config = config_class(vocab_size=size["vocab_size"], d_model=size["d_model"], d_kv=size["d_kv"],
                          d_ff=size["d_ff"], num_layers=size["num_layers"], num_heads=size["num_heads"],
                          feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                          relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.0,
                          tie_word_embeddings=False)
    model = model_class._from_config(config, attn_implementation=implementation, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # The encoder's embed_tokens is the same tensor as shared (tied inside T5Stack).
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}, (missing, unexpected)
    return model.eval()
