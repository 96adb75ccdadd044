"""Parity of the performance paths with the plain ones they replace.

* ``causal=True`` on every attention backend equals an explicit causal mask,
  alone, combined with a padding mask and with fewer queries than keys.
* The text model's causal path (no attention mask) equals the explicit-mask
  path (an all-ones attention mask), and its pooled-row-only last layer, which
  computes k/v only up to the pooled token, equals the full forward.
* In-place activations and residual adds equal the out-of-place ones, and
  autograd still works (it keeps the out-of-place ops).
* ``ops.cache_weight_casts`` gives the uncached result, notices in-place and
  reassigned weights, and drops its copies when disabled.
* ``Linear(x, out=buffer)`` has F.linear's bits, and the per-forward scratch
  buffer that fc1 writes into is one buffer for every layer, used only
  without autograd, and skipped for operations without ``out=``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from random_weights import randomize_

from textenc.nn import clip_layers, ops
from textenc.nn.attention import ATTENTION_BACKENDS, optimized_attention_for_device
from textenc.nn.clip_model import CLIPTextModel, CLIPVisionModelProjection
from textenc.nn.config import load_text_config, load_vision_config

TOL = 1e-5
CPU_BACKENDS = ["sdpa", "bmm", "split", "basic"]


def small_text(config: str = "sd1_clip_config", *, layers: int = 3, hidden_act: str | None = None,
               seed: int = 0, operations=ops.disable_weight_init, dtype=torch.float32) -> CLIPTextModel:
    values = dataclasses.asdict(load_text_config(config))
    values.update(hidden_size=128, intermediate_size=512, num_attention_heads=2,
                  num_hidden_layers=layers, projection_dim=64)
    if hidden_act:
        values["hidden_act"] = hidden_act
    model = CLIPTextModel(values, dtype=torch.float32, operations=operations)
    randomize_(model, seed)
    return model.to(dtype).eval()


def ids_and_mask(batch_ends=(5, 76, 12)) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 77) ids with BOS, words, EOS at each ``end``, pad after; mask up to EOS."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 49000, (len(batch_ends), 77), generator=generator)
    mask = torch.zeros_like(ids)
    for row, end in enumerate(batch_ends):
        ids[row, 0], ids[row, end], ids[row, end + 1:] = 49406, 49407, 49407
        mask[row, : end + 1] = 1
    return ids, mask


def causal_additive(tq: int, tk: int) -> torch.Tensor:
    return torch.full((tq, tk), torch.finfo(torch.float32).min).triu_(1)


# ---- attention backends ---------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padding", [False, True])
def test_causal_flag_equals_explicit_causal_mask(backend, padding):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 16, generator=generator) * 3 for _ in range(3))
    mask = None
    explicit = causal_additive(9, 9).view(1, 1, 9, 9)
    if padding:
        keys_blocked = torch.tensor([[0] * 9, [0] * 6 + [1] * 3]).bool().view(2, 1, 1, 9)
        mask = torch.zeros(2, 1, 1, 9).masked_fill(keys_blocked, torch.finfo(torch.float32).min)
        explicit = explicit.masked_fill(keys_blocked, torch.finfo(torch.float32).min)
    attention = optimized_attention_for_device("cpu", mask=padding, backend=backend)
    got = attention(q, k, v, 4, mask, causal=True)
    expected = ATTENTION_BACKENDS["basic"](q, k, v, 4, explicit)
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_causal_flag_with_fewer_queries_than_keys_is_top_left(backend):
    # Query i sees keys 0..i whatever the key count (the module's convention).
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(1, 3, 8, generator=generator)
    k, v = torch.randn(1, 5, 8, generator=generator), torch.randn(1, 5, 8, generator=generator)
    got = ATTENTION_BACKENDS[backend](q, k, v, 2, None, causal=True)
    expected = ATTENTION_BACKENDS["basic"](q, k, v, 2, causal_additive(3, 5))
    assert (got - expected).abs().max() <= TOL


# ---- text model -------------------------------------------------------------------

@pytest.mark.parametrize("config", ["sd1_clip_config", "sd2_clip_config"])
@torch.no_grad()
def test_causal_path_equals_explicit_mask_path(config):
    model = small_text(config)
    ids, _ = ids_and_mask()
    causal = model(ids, intermediate_output=-2)
    explicit = model(ids, attention_mask=torch.ones_like(ids), intermediate_output=-2)
    for got, expected in zip(causal, explicit):
        assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("ends", [(5, 76, 12), (3,), (76,)])
@torch.no_grad()
def test_pooled_row_tail_equals_full_forward(padding, ends):
    model = small_text(layers=4)
    ids, mask = ids_and_mask(ends)
    attention_mask = mask if padding else None
    full = model(ids, attention_mask=attention_mask, intermediate_output=-2)
    tail = model(ids, attention_mask=attention_mask, intermediate_output=-2, return_last_hidden=False)
    assert tail.last_hidden_state is None
    assert (tail.intermediate - full.intermediate).abs().max() <= TOL
    assert (tail.pooled_output - full.pooled_output).abs().max() <= TOL
    assert (tail.projected_pooled - full.projected_pooled).abs().max() <= TOL


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu", "gelu_pytorch_tanh"])
def test_inplace_activations_match(activation):
    x = torch.randn(4, 7, 33) * 4
    expected = clip_layers.ACTIVATION_FUNCTIONS[activation](x)
    got = clip_layers.INPLACE_ACTIVATIONS[activation](x.clone())
    # Bit-identical: the in-place ops compute the same expression.
    assert torch.equal(got, expected)


@pytest.mark.parametrize("config", ["sd1_clip_config", "sd2_clip_config"])
def test_inference_paths_equal_autograd_paths(config):
    """no_grad uses in-place activation/residuals; with grad, out-of-place. Same values."""
    model = small_text(config)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        fast = model(ids, attention_mask=mask, intermediate_output="all")
    model.requires_grad_(True)
    slow = model(ids, attention_mask=mask, intermediate_output="all")
    assert (fast.last_hidden_state - slow.last_hidden_state).abs().max() == 0
    assert (fast.intermediate - slow.intermediate).abs().max() == 0
    slow.pooled_output.sum().backward()  # autograd still works through the layers
    assert model.text_model.encoder.layers[0].mlp.fc1.weight.grad is not None


@torch.no_grad()
def test_inference_mode_does_not_touch_the_input_embeddings():
    model = small_text()
    ids, _ = ids_and_mask()
    embeds = model.text_model.embeddings(ids)
    before = embeds.clone()
    model(None, embeds=embeds, num_tokens=[6, 77, 13])
    assert torch.equal(embeds, before)


@torch.no_grad()
def test_vision_inplace_path_matches_autograd_path():
    values = dataclasses.asdict(load_vision_config("clip_vision_config_vitl"))
    values.update(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                  projection_dim=32, image_size=28)
    model = CLIPVisionModelProjection(values).eval()
    randomize_(model)
    pixels = torch.randn(2, 3, 28, 28)
    fast = model(pixels, intermediate_output=-2)
    with torch.enable_grad():
        model.requires_grad_(True)
        slow = model(pixels, intermediate_output=-2)
    assert torch.equal(fast.image_embeds, slow.image_embeds.detach())


# ---- cached casts ---------------------------------------------------------------------

@torch.no_grad()
def test_cached_cast_matches_per_forward_cast():
    plain = small_text(operations=ops.manual_cast, dtype=torch.float16)
    cached = small_text(operations=ops.manual_cast, dtype=torch.float16)
    ops.cache_weight_casts(cached)
    ids, mask = ids_and_mask()
    expected = plain(ids, attention_mask=mask)
    for _ in range(2):  # the second call reads the cache
        got = cached(ids, attention_mask=mask)
        assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    fc1 = cached.text_model.encoder.layers[0].mlp.fc1
    assert {v[1].dtype for v in fc1._cast_cache.values()} == {torch.float32}


@torch.no_grad()
def test_cached_cast_sees_weight_updates_and_can_be_disabled():
    layer = ops.manual_cast.Linear(4, 3, dtype=torch.float16)
    torch.nn.init.ones_(layer.weight), torch.nn.init.zeros_(layer.bias)
    ops.cache_weight_casts(layer)
    x = torch.ones(1, 4)
    assert layer(x).tolist() == [[4.0, 4.0, 4.0]]
    layer.weight.mul_(2)  # in place: version counter changes
    assert layer(x).tolist() == [[8.0, 8.0, 8.0]]
    layer.weight = torch.nn.Parameter(torch.full((3, 4), 3.0, dtype=torch.float16))  # reassigned
    assert layer(x).tolist() == [[12.0, 12.0, 12.0]]
    assert layer._cast_cache
    ops.cache_weight_casts(layer, enabled=False)
    assert not hasattr(layer, "_cast_cache") and layer(x).tolist() == [[12.0, 12.0, 12.0]]


def test_cached_cast_is_off_by_default_and_same_dtype_is_never_cached():
    layer = ops.manual_cast.Linear(4, 3, dtype=torch.float32)
    torch.nn.init.ones_(layer.weight), torch.nn.init.zeros_(layer.bias)
    assert layer.cache_casts is False
    ops.cache_weight_casts(layer)
    layer(torch.ones(1, 4))
    assert not getattr(layer, "_cast_cache", {})  # fp32 weights, fp32 input: nothing to keep


@torch.no_grad()
def test_bf16_compute_stays_close_to_fp32():
    model32 = small_text()
    model16 = small_text(dtype=torch.bfloat16)
    ids, mask = ids_and_mask()
    reference = model32(ids, attention_mask=mask).last_hidden_state
    got = model16(ids, attention_mask=mask, dtype=torch.bfloat16).last_hidden_state.float()
    # bf16 keeps 8 mantissa bits: ~0.4% relative per op; hidden states are O(1-10).
    assert (got - reference).abs().max() <= 0.1 * reference.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 77, 3072), (16, 77, 3072), (3, 5, 7), (2, 300, 1000)])
def test_chunked_inplace_quick_gelu_is_bit_identical(shape, dtype, monkeypatch):
    """The cache-sized chunks of the in-place quick_gelu must not change a single
    bit, in every dtype (the 1.702 constant must round as the Python scalar does)."""
    monkeypatch.setattr(clip_layers, "QUICK_GELU_CHUNK", 4096)  # force many chunks, ragged last one
    x = (torch.randn(shape, dtype=torch.float64) * 20).to(dtype)
    expected = x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's formula, out of place
    assert torch.equal(clip_layers._quick_gelu_(x.clone()), expected)


# ---- fc1 output into a reused buffer ------------------------------------------------------

@pytest.mark.parametrize("operations,dtype", [(ops.disable_weight_init, torch.float32),
                                              (ops.manual_cast, torch.float16)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 768), (3, 77, 768)])
def test_linear_out_buffer_has_f_linear_bits(operations, dtype, bias, shape):
    # 768 inputs: long enough that the GEMM blocks its reduction, where adding
    # the bias after an mm (instead of addmm's) rounds differently.
    layer = operations.Linear(768, 40, bias=bias, dtype=dtype)
    randomize_(layer, seed=3)
    x = torch.randn(shape)
    expected = F.linear(x, layer.weight.float(), None if layer.bias is None else layer.bias.float())
    buffer = torch.full((*shape[:-1], 40), float("nan"))
    with torch.no_grad():
        got = layer(x, out=buffer)
    assert got is buffer and torch.equal(got, expected)


def test_one_scratch_buffer_serves_every_layer(monkeypatch):
    model = small_text(layers=4)
    ids, mask = ids_and_mask()
    lent = []
    original = clip_layers._Scratch.take

    def recording_take(self, shape, dtype, device):
        lent.append(original(self, shape, dtype, device))
        return lent[-1]

    monkeypatch.setattr(clip_layers._Scratch, "take", recording_take)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert len(lent) == 4 and len({t.data_ptr() for t in lent}) == 1
    assert lent[0].shape == (3, 77, 512)
    lent.clear()
    model.requires_grad_(True)
    model(ids, attention_mask=mask).pooled_output.sum().backward()
    assert lent == []  # autograd on: out= ops would not record gradients


class _PlainLinear(torch.nn.Linear):
    """A user-supplied Linear without ``out=`` (e.g. a quantised layer)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _PlainOps(ops.disable_weight_init):
    Linear = _PlainLinear


class _OverriddenLinear(ops.disable_weight_init.Linear):
    """A subclass of our Linear whose forward takes no ``out`` (e.g. a LoRA patch)."""

    def forward(self, x):
        return super().forward(x)


class _OverriddenOps(ops.disable_weight_init):
    Linear = _OverriddenLinear


@pytest.mark.parametrize("operations", [_PlainOps, _OverriddenOps])
def test_operations_without_out_keep_the_allocating_path(operations):
    assert not ops.accepts_out(operations.Linear(4, 4))
    plain = small_text(operations=operations, seed=4)
    reference = small_text(seed=4)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        got, expected = plain(ids, attention_mask=mask), reference(ids, attention_mask=mask)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
