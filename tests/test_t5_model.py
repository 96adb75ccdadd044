"""textenc.nn.t5 against transformers' T5EncoderModel / UMT5EncoderModel (the oracle).

Tiny random T5 v1.1 and UMT5 in the real key layout, loaded through the config read
from the state dict's shapes (the path a real file takes): last hidden state and every
intermediate layer within 1e-5 relative (fp32), at 1 and 2 torch threads, for every
attention backend available on CPU, with and without an attention mask, against
transformers' eager and SDPA attention. Plus one full-size T5-XXL block (random
weights) against transformers' ``T5Block``.
"""

from __future__ import annotations

import functools
import json
import math
import time

import pytest
import torch

from t5_weights import TINY, hf_encoder, random_t5_state_dict
from textenc.errors import CheckpointError, ConfigError
from textenc.nn import ops
from textenc.nn.attention import available_backends
from textenc.nn.t5 import T5, T5Block, attention_mask_bias, relative_position_bucket
from textenc.nn.t5_config import (T5Config, load_t5_config, released_t5_name, t5_config_from_state_dict)

transformers = pytest.importorskip("transformers")

MODEL_TYPES = ("t5", "umt5")
BACKENDS = available_backends("cpu")
#: Token count of the long case: past max_distance 128, so every bucket is used.
LONG = 140


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """max|got - want| <= rtol * max|want| (the issue's "relative" tolerance)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    error = float((got - want).abs().max())
    assert error <= rtol * float(want.abs().max()), f"max|Δ| {error:.3g} vs max|x| {float(want.abs().max()):.3g}"


@functools.lru_cache(maxsize=None)
def state_dict(model_type: str) -> dict[str, torch.Tensor]:
    return random_t5_state_dict(model_type, seed=3)


@functools.lru_cache(maxsize=None)
def ours(model_type: str) -> T5:
    sd = state_dict(model_type)
    model = T5(t5_config_from_state_dict(sd), dtype=torch.float32, device="meta", operations=ops.manual_cast)
    model.load_state_dict(sd, assign=True)
    return model.eval()


@functools.lru_cache(maxsize=None)
def hf(model_type: str, implementation: str):
    return hf_encoder(state_dict(model_type), model_type, implementation)


def inputs(tokens: int, masked: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, TINY["vocab_size"], (2, tokens), generator=generator)
    if not masked:
        return ids, None
    mask = torch.ones(2, tokens, dtype=torch.long)
    mask[1, tokens // 2:] = 0  # second row: padding after half its tokens
    return ids, mask


@functools.lru_cache(maxsize=None)
def reference(model_type: str, implementation: str, tokens: int, masked: bool):
    """transformers' (last, every layer normed, every layer raw), computed once (at whatever thread count)."""
    ids, mask = inputs(tokens, masked)
    model = hf(model_type, implementation)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        # hidden_states[i + 1] is block i's output; the last one is already after the final norm.
        raw = list(out.hidden_states[1:])
        normed = [model.encoder.final_layer_norm(h) for h in raw[:-1]] + [raw[-1]]
    return out.last_hidden_state, torch.stack(normed, dim=1), torch.stack(raw[:-1], dim=1)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_every_layer_matches_transformers(model_type, backend, masked, threads):
    """Against transformers' eager attention: the last hidden state, and every layer with
    and without the final norm (the last layer's raw output is never returned by HF)."""
    ids, mask = inputs(9, masked)
    last, normed, raw = reference(model_type, "eager", 9, masked)
    model = ours(model_type)
    with torch.no_grad():
        assert_close(model(ids, mask, attention_backend=backend).last_hidden_state, last)
        stacked = model(ids, mask, intermediate_output="all", attention_backend=backend).intermediate
        plain = model(ids, mask, intermediate_output="all", final_layer_norm_intermediate=False,
                      attention_backend=backend, return_last_hidden=False).intermediate
    for layer in range(TINY["num_layers"]):
        assert_close(stacked[:, layer], normed[:, layer])
        if layer < TINY["num_layers"] - 1:
            assert_close(plain[:, layer], raw[:, layer])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_matches_transformers_sdpa(model_type, masked, threads):
    """transformers' SDPA attention as the oracle too (our automatic backend choice)."""
    ids, mask = inputs(9, masked)
    last, normed, _ = reference(model_type, "sdpa", 9, masked)
    with torch.no_grad():
        out = ours(model_type)(ids, mask, intermediate_output=-2)
    assert_close(out.last_hidden_state, last)
    assert_close(out.intermediate, normed[:, -2])


def test_layer_indices_select_the_stacked_layer():
    model, (ids, mask) = ours("t5"), inputs(9, masked=True)
    layers = TINY["num_layers"]
    with torch.no_grad():
        stacked = model(ids, mask, intermediate_output="all").intermediate
        for layer in range(layers):
            for index in (layer, layer - layers):
                assert torch.equal(model(ids, mask, intermediate_output=index).intermediate, stacked[:, layer])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_uses_every_bucket(model_type, backend):
    ids, mask = inputs(LONG, masked=True)
    with torch.no_grad():
        got = ours(model_type)(ids, mask, attention_backend=backend).last_hidden_state
    assert_close(got, reference(model_type, "eager", LONG, True)[0])


def test_buckets_equal_transformers():
    offsets = torch.arange(-300, 301).view(1, -1)
    want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        offsets, bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(relative_position_bucket(offsets, 32, 128), want)


def test_embeds_and_stop_early_give_the_same_bits():
    model, (ids, mask) = ours("t5"), inputs(9, masked=True)
    with torch.no_grad():
        full = model(ids, mask, intermediate_output=1)
        early = model(ids, mask, intermediate_output=1, return_last_hidden=False)
        embeds = model(None, mask, embeds=model.shared(ids), intermediate_output=1)
    assert early.last_hidden_state is None and torch.equal(early.intermediate, full.intermediate)
    assert torch.equal(embeds.last_hidden_state, full.last_hidden_state)
    assert full.pooled_output is None and full.projected_pooled is None


def test_mask_is_comfyui_negative_max():
    bias = attention_mask_bias(torch.tensor([[1, 1, 0]]), torch.float32)
    assert bias.shape == (1, 1, 3, 3)
    assert bias[0, 0, :, :2].eq(0).all() and bias[0, 0, :, 2].eq(-torch.finfo(torch.float32).max).all()


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_embedding_rows_are_made_finite(fp8):
    sd = dict(state_dict("t5"))
    model = T5(t5_config_from_state_dict(sd), dtype=torch.float32, device="meta", operations=ops.manual_cast)
    shared = sd["shared.weight"].to(fp8)
    shared[5] = float("nan")  # a NaN code in the fp8 table (e4m3fn has no inf)
    model.load_state_dict({**sd, "shared.weight": shared}, assign=True)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = model(ids).last_hidden_state
        reference = model(None, embeds=torch.nan_to_num(shared[ids].float())).last_hidden_state
    assert torch.isfinite(out).all() and torch.equal(out, reference)


# ---- config -------------------------------------------------------------------

@pytest.mark.parametrize("name,vocab,model_type", [("t5_xxl", 32128, "t5"), ("umt5_xxl", 256384, "umt5")])
def test_released_configs(name, vocab, model_type):
    # google/t5-v1_1-xxl and google/umt5-xxl config.json (ComfyUI's t5_config_xxl.json / umt5_config_xxl.json).
    cfg = load_t5_config(name)
    assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.num_layers) == \
        (vocab, 4096, 10240, 64, 64, 24)
    assert (cfg.model_type, cfg.dense_act_fn, cfg.is_gated_act, cfg.layer_norm_epsilon) == \
        (model_type, "gelu_pytorch_tanh", True, 1e-6)
    assert released_t5_name(cfg) == name
    assert released_t5_name(load_t5_config({**TINY})) is None


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_config_from_full_size_shapes(model_type):
    name = f"{model_type}_xxl"
    shapes = {key: torch.empty(value.shape, device="meta")
              for key, value in T5(name, device="meta").state_dict().items()}
    assert released_t5_name(t5_config_from_state_dict(shapes)) == name


def test_config_reads_transformers_json():
    # What save_pretrained writes (a diffusers text_encoder_2/config.json).
    hf_config = transformers.T5Config(d_model=64, d_ff=160, num_heads=4, d_kv=16, num_layers=3,
                                      vocab_size=128, feed_forward_proj="gated-gelu").to_json_string()
    cfg = load_t5_config(json.loads(hf_config))
    assert (cfg.dense_act_fn, cfg.is_gated_act, cfg.num_layers) == ("gelu_new", True, 3)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key.*'d_modle'"):
        load_t5_config({**TINY, "d_modle": 3})
    with pytest.raises(ConfigError, match="num_heads must be a positive integer"):
        load_t5_config({**TINY, "num_heads": 0})
    with pytest.raises(ConfigError, match="model_type"):
        T5Config(**TINY, model_type="mt5")
    with pytest.raises(CheckpointError, match="relative_attention_bias"):
        sd = dict(state_dict("t5"))
        del sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        t5_config_from_state_dict(sd)


# ---- one full-size T5-XXL block ------------------------------------------------------

@pytest.mark.slow  # 10-25 s here (two 0.77 GB fp32 blocks of random weights)
def test_full_size_xxl_block_matches_transformers_t5block():
    """d_model 4096, d_ff 10240, 64 heads of 64: one block with random weights, fp32."""
    started = time.perf_counter()
    cfg = load_t5_config("t5_xxl")
    hf_config = transformers.T5Config(d_model=4096, d_ff=10240, num_heads=64, d_kv=64, num_layers=1,
                                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    hf_config._attn_implementation = "eager"
    with torch.device("meta"):
        reference = transformers.models.t5.modeling_t5.T5Block(hf_config, has_relative_attention_bias=True,
                                                               layer_idx=0)
    ours_block = T5Block(cfg, True, dtype=torch.float32, device="meta", operations=ops.manual_cast)
    generator = torch.Generator().manual_seed(0)
    sd = {}
    for key, value in ours_block.state_dict().items():
        fan_in = value.shape[1] if "relative" not in key and value.dim() == 2 else 1
        base = 1.0 if key.endswith("layer_norm.weight") else 0.0
        sd[key] = base + torch.randn(value.shape, generator=generator) / math.sqrt(fan_in)
    ours_block.load_state_dict(sd, assign=True)
    reference.load_state_dict(sd, assign=True)
    reference.eval()
    x = 10.0 * torch.randn(1, 16, 4096, generator=generator)
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[0, 12:] = 0
    bias = attention_mask_bias(mask, torch.float32)
    with torch.no_grad():
        want = reference(x, attention_mask=bias)[0]
        attention = functools.partial(_attention, backend="basic")
        got = ours_block(x, bias + ours_block.self_attention.position_bias(16, torch.float32, "cpu"), attention)
    assert_close(got, want)
    assert time.perf_counter() - started < 60


def _attention(q, k, v, heads, mask, *, backend):
    from textenc.nn.attention import ATTENTION_BACKENDS

    return ATTENTION_BACKENDS[backend](q, k, v, heads, mask)


def test_doctests():
    import doctest

    from textenc.nn import t5, t5_config

    for module in (t5, t5_config):
        result = doctest.testmod(module)
        assert result.attempted and not result.failed, module.__name__


def test_cpu_fp32_takes_bmm_at_every_length(monkeypatch):
    """bmm (ComfyUI's CPU attention_basic bit for bit) past CLIP's 128-token limit; overrides still win."""
    from textenc.nn.t5 import _backend_choice

    monkeypatch.delenv("TEXTENC_ATTENTION", raising=False)
    x = torch.zeros(1, 512, 8)
    assert _backend_choice(None, x) == "bmm"
    assert _backend_choice(None, x.bfloat16()) is None
    assert _backend_choice("sdpa", x) == "sdpa"
    monkeypatch.setenv("TEXTENC_ATTENTION", "split")
    assert _backend_choice(None, x) is None  # the environment variable decides
    monkeypatch.setenv("TEXTENC_ATTENTION", "auto")
    assert _backend_choice(None, x) == "bmm"
    ids, mask = inputs(LONG, masked=True)
    with torch.no_grad():
        auto = ours("t5")(ids, mask).last_hidden_state
        assert torch.equal(auto, ours("t5")(ids, mask, attention_backend="bmm").last_hidden_state)
