"""The reused CPU cast buffer (textenc.nn.scratch): same bits as a plain cast, one owner thread."""

from __future__ import annotations

import contextvars
import threading

import pytest
import torch
import torch.nn.functional as F

from t5_weights import random_t5_state_dict
from textenc.nn import ops
from textenc.nn.packed import ScaledFloat8Weight
from textenc.nn.scratch import can_cast_into_buffer, cast_into_buffer, reuse_cast_buffer
from textenc.text_encoders.t5 import T5XXLModel, T5XXLTokenizer


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.nn.Module:
    layer = ops.manual_cast.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                   dtype=torch.float16, device="meta")
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer


def _fp8(shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 40).clamp(-440, 440).to(torch.float8_e4m3fn), torch.tensor(0.0021)


def test_linears_in_the_buffer_match_plain_casts(threads):
    g = torch.Generator().manual_seed(0)
    # A large then a small then a larger weight: the buffer is reused, then grows.
    weights = [torch.randn(shape, generator=g).half() for shape in ((640, 512), (96, 640), (1280, 96))]
    bias = torch.randn(1280, generator=g).half()
    x = torch.randn(1, 77, 512, generator=g)
    layers = [_linear(w) for w in weights[:2]] + [_linear(weights[2], bias)]
    with torch.inference_mode():
        expected = x
        for w in weights[:2]:
            expected = F.linear(expected, w.float())
        expected = F.linear(expected, weights[2].float(), bias.float())
        with reuse_cast_buffer():
            got = x
            for layer in layers:
                got = layer(got)
    assert torch.equal(got, expected)


def test_scaled_fp8_decodes_into_the_buffer_as_comfyui(threads):
    raw, scale = _fp8((300, 256), 1)
    x = torch.randn(1, 77, 256, generator=torch.Generator().manual_seed(2))
    layer = _linear(ScaledFloat8Weight(raw, scale))
    with torch.inference_mode(), reuse_cast_buffer():
        # comfy_kitchen dequantize_per_tensor_fp8: x.to(dtype) * scale.to(dtype).
        assert torch.equal(cast_into_buffer(layer.weight, torch.float32), raw.float() * scale.float())
        assert torch.equal(layer(x), F.linear(x, raw.float() * scale.float()))


def _fp16_t5() -> T5XXLModel:
    """A small fp16 T5 v1.1 with the real vocabulary (so the bundled tokenizer's ids fit)."""
    sd = random_t5_state_dict("t5", seed=3, vocab_size=32128, d_model=256, d_kv=64, d_ff=640, num_heads=4)
    return T5XXLModel.from_state_dict({k: v.half() for k, v in sd.items()})


def test_t5_encode_matches_the_fresh_cast_path(threads, monkeypatch):
    model = _fp16_t5()
    calls = []
    monkeypatch.setattr(ops, "cast_into_buffer", lambda *a: calls.append(a) or cast_into_buffer(*a))
    tokens = T5XXLTokenizer(min_length=24).tokenize_with_weights("a red fox (in the snow:1.2)")
    buffered = model.encode_token_weights(tokens)[0]
    assert len(calls) >= 7 * 3  # every Linear of the 3 blocks went through the buffer
    # Cached casts go through tensor.to(dtype), never through the buffer.
    ops.cache_weight_casts(model)
    plain = model.encode_token_weights(tokens)[0]
    assert torch.equal(buffered, plain)


def test_two_threads_encoding_at_once_get_their_own_buffers():
    model = _fp16_t5()
    prompts = ["a red fox", "a blue whale (swimming:1.3)"]
    tokenizer = T5XXLTokenizer(min_length=24)
    expected = [model.encode_token_weights(tokenizer.tokenize_with_weights(p))[0] for p in prompts]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def run(i: int) -> None:
        start.wait()
        for _ in range(3):
            results[i].append(model.encode_token_weights(tokenizer.tokenize_with_weights(prompts[i]))[0])

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for i in range(2):
        assert len(results[i]) == 3 and all(torch.equal(r, expected[i]) for r in results[i])


def test_buffer_applies_only_in_its_own_thread_and_block():
    weight = torch.ones(4, 4, dtype=torch.float16)
    assert not can_cast_into_buffer(weight)
    with reuse_cast_buffer():
        assert can_cast_into_buffer(weight)
        copied = contextvars.copy_context()
        seen = []
        thread = threading.Thread(target=lambda: seen.append(copied.run(can_cast_into_buffer, weight)))
        thread.start()
        thread.join()
        assert seen == [False]  # a copied context in another thread falls back to plain casts
    assert not can_cast_into_buffer(weight)


def test_weights_autograd_keeps_are_not_buffered():
    weight = torch.ones(4, 4, dtype=torch.float16, requires_grad=True)
    with reuse_cast_buffer():
        assert not can_cast_into_buffer(weight)
        with torch.no_grad():
            assert can_cast_into_buffer(weight)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_fp8_table_decoding_is_bit_equal_for_every_code(fp8, dtype):
    raw = torch.arange(256, dtype=torch.uint8).repeat(3).view(fp8).reshape(24, 32)  # NaN and inf codes too
    scale = torch.tensor(0.37)
    weight = ScaledFloat8Weight(raw, scale)
    got = weight.decode_into(torch.empty(raw.shape, dtype=dtype))
    want = raw.to(dtype) * scale.to(dtype)  # comfy_kitchen's dequantize_per_tensor_fp8
    assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_module_doctests():
    import doctest

    from textenc.nn import packed, scratch
    for module in (scratch, packed):
        result = doctest.testmod(module, raise_on_error=False)
        assert result.failed == 0 and result.attempted > 0, module.__name__
