"""Large CPU fp32 products in column blocks (textenc.nn.gemm): F.linear's bits, checked per shape."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from t5_weights import random_t5_state_dict
from textenc.nn import gemm, ops
from textenc.text_encoders.t5 import T5XXLModel, T5XXLTokenizer

pytestmark = pytest.mark.skipif(gemm._mkl() is None, reason="column blocks need torch's MKL")


@pytest.fixture
def two_threads(monkeypatch):
    """2 threads, every weight large enough to split, verdicts of this test only."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(gemm, "MIN_WEIGHT_ELEMENTS", 0)
    monkeypatch.setattr(gemm, "_VERDICTS", {})
    yield
    torch.set_num_threads(before)


@pytest.fixture
def split_calls(monkeypatch):
    calls = []
    original = gemm._split_into
    monkeypatch.setattr(gemm, "_split_into", lambda *a: calls.append(a[1].shape) or original(*a))
    return calls


def _data(rows: int, columns: int, depth: int, seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, depth, generator=g)
    w = torch.randn(columns, depth, generator=g) * depth ** -0.5
    return x, w, (torch.randn(columns, generator=g) if bias else None)


@pytest.mark.parametrize("rows,columns,depth", [(77, 1536, 512), (256, 1000, 320), (1, 2048, 256), (130, 600, 1024)])
@pytest.mark.parametrize("bias", [False, True])
def test_blocks_give_f_linear_bits(two_threads, split_calls, rows, columns, depth, bias):
    x, w, b = _data(rows, columns, depth, bias=bias)
    expected = F.linear(x, w, b)
    first, second = gemm.linear(x, w, b), gemm.linear(x, w, b)  # checked, then trusted
    assert len(split_calls) == 2
    assert list(gemm._VERDICTS.values()) == [True]
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_batched_input_and_out_buffer(two_threads, split_calls):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 77, 384, generator=g), torch.randn(1024, 384, generator=g)
    expected = F.linear(x, w)
    out = torch.empty(2, 77, 1024)
    for _ in range(2):
        assert gemm.linear(x, w, out=out) is out
        assert torch.equal(out, expected)
    assert torch.equal(gemm.linear(x, w), expected)
    assert len(split_calls) == 3


def test_inference_mode_tensors(two_threads, split_calls):
    x, w, _ = _data(77, 1024, 256)
    with torch.inference_mode():
        got = gemm.linear(x, w)
        got = gemm.linear(x, w)  # the workers write into an inference tensor
    assert split_calls and torch.equal(got, F.linear(x, w))


def test_a_shape_whose_blocks_differ_is_never_split(two_threads, monkeypatch, split_calls):
    original = gemm._block_product

    def off_by_one_ulp(rows, weight, bias, target, block):
        original(rows, weight, bias, target, block)
        target[:, block] = torch.nextafter(target[:, block], torch.tensor(float("inf")))
    monkeypatch.setattr(gemm, "_block_product", off_by_one_ulp)
    x, w, _ = _data(77, 1024, 256)
    expected = F.linear(x, w)
    assert torch.equal(gemm.linear(x, w), expected)  # the check's reference is returned
    assert list(gemm._VERDICTS.values()) == [False]
    assert torch.equal(gemm.linear(x, w), expected)
    assert len(split_calls) == 1  # the check only


@pytest.mark.parametrize("case", ["one-thread", "small", "fp16", "grad", "narrow"])
def test_where_blocks_do_not_apply(two_threads, monkeypatch, case):
    x, w, _ = _data(77, 1024, 256)
    if case == "one-thread":
        torch.set_num_threads(1)
    elif case == "small":
        monkeypatch.setattr(gemm, "MIN_WEIGHT_ELEMENTS", w.numel() + 1)
    elif case == "fp16":
        x, w = x.half(), w.half()
    elif case == "grad":
        x.requires_grad_(True)
    else:
        w = w[:511]  # fewer than 256 columns per thread
    assert not gemm.split_applies(x, w, None)


def test_autograd_keeps_its_graph(two_threads):
    x, w, b = _data(77, 1024, 256, bias=True)
    w.requires_grad_(True)
    gemm.linear(x, w, b).square().sum().backward()
    want = w.detach().clone().requires_grad_(True)
    F.linear(x, want, b).square().sum().backward()
    assert torch.equal(w.grad, want.grad)


def test_a_worker_error_reaches_the_caller(two_threads, monkeypatch):
    original = gemm._block_product

    def fail_in_worker(rows, weight, bias, target, block):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("worker failed")
        original(rows, weight, bias, target, block)
    monkeypatch.setattr(gemm, "_block_product", fail_in_worker)
    x, w, _ = _data(77, 4096, 256)
    with pytest.raises(RuntimeError, match="worker failed"):
        gemm.linear(x, w)
    monkeypatch.setattr(gemm, "_block_product", original)
    assert torch.equal(gemm.linear(x, w), F.linear(x, w))  # the pool still works


def test_mkl_thread_setting_is_local_and_restored(two_threads):
    mkl = gemm._mkl()
    before = mkl._max_threads()
    x, w, _ = _data(77, 1024, 256)
    gemm.linear(x, w)
    assert mkl._max_threads() == before == 2
    seen = []
    thread = threading.Thread(target=lambda: seen.append(mkl.set_local(1)) or seen.append(mkl._max_threads()))
    thread.start()
    thread.join()
    assert seen[1] == 1 and mkl._max_threads() == 2  # another thread's setting does not leak here


def test_one_pool_per_thread_count_and_a_fresh_one_after_fork(two_threads, monkeypatch):
    x, w, _ = _data(77, 1024, 256)
    gemm.linear(x, w)
    pool = gemm._STATE["pools"][2]
    torch.set_num_threads(3)
    assert torch.equal(gemm.linear(x, w), F.linear(x, w))
    torch.set_num_threads(2)
    gemm.linear(x, w)
    assert gemm._STATE["pools"][2] is pool and 3 in gemm._STATE["pools"]  # none shut down under a caller
    monkeypatch.setattr(gemm.os, "getpid", lambda: -1)  # as in a forked child
    assert torch.equal(gemm.linear(x, w), F.linear(x, w))
    assert gemm._STATE["pools"][2] is not pool


def _t5() -> T5XXLModel:
    """A T5 v1.1 wide enough for blocks (q/k/v 512 and wi 1024 columns) with the real vocabulary."""
    sd = random_t5_state_dict("t5", seed=5, vocab_size=32128, d_model=256, d_kv=64, d_ff=1024, num_heads=8)
    return T5XXLModel.from_state_dict(sd)


def test_t5_encode_bits_with_and_without_blocks(two_threads, monkeypatch, split_calls):
    model = _t5()
    tokens = T5XXLTokenizer(min_length=77).tokenize_with_weights("a red fox (in the snow:1.2)")
    with torch.inference_mode():
        monkeypatch.setattr(gemm, "MIN_WEIGHT_ELEMENTS", 2**62)
        plain = model.encode_token_weights(tokens)[0]
        assert not split_calls
        monkeypatch.setattr(gemm, "MIN_WEIGHT_ELEMENTS", 0)
        blocked = model.encode_token_weights(tokens)[0]
        assert split_calls
        results = []
        threads = [threading.Thread(target=lambda: results.append(model.encode_token_weights(tokens)[0]))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert torch.equal(blocked, plain)
    assert len(results) == 2 and all(torch.equal(r, plain) for r in results)


def test_ops_linear_goes_through_gemm(two_threads, split_calls):
    x, w, b = _data(77, 1024, 256, bias=True)
    layer = ops.manual_cast.Linear(256, 1024, dtype=torch.float16, device="meta")
    layer.weight = torch.nn.Parameter(w.half(), requires_grad=False)
    layer.bias = torch.nn.Parameter(b.half(), requires_grad=False)
    with torch.inference_mode():
        got = layer(x)
    assert split_calls and torch.equal(got, F.linear(x, w.half().float(), b.half().float()))
