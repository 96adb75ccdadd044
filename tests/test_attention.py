"""textenc.nn.attention: every backend against the reference, and the selection rules."""

from __future__ import annotations

import doctest
import functools
import math
import subprocess
import sys

import pytest
import torch

from textenc.nn import attention
from textenc.nn.attention import (ENV_VAR, attention_basic, attention_split, available_backends,
                                  optimized_attention_for_device, select_backend)
from textenc.errors import BackendUnavailableError

TOL = 1e-5
BATCH, TOKENS = 3, 77


def qkv(heads: int, head_dim: int = 16, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # Scaled up so softmax is peaked: a dropped mask or scale shows clearly.
    return [2 * torch.randn(BATCH, TOKENS, heads * head_dim, generator=generator, dtype=dtype)
            for _ in range(3)]


def causal_mask(dtype=torch.float32) -> torch.Tensor:
    # (1, 1, T, T) additive, as CLIPTextModel builds it.
    blocked = torch.finfo(dtype).min
    return torch.full((TOKENS, TOKENS), blocked, dtype=dtype).triu_(1).view(1, 1, TOKENS, TOKENS)


def causal_padding_mask(dtype=torch.float32) -> torch.Tensor:
    # (B, 1, T, T): causal plus right padding of different lengths per prompt.
    lengths = torch.tensor([9, TOKENS, 30])
    padded = torch.arange(TOKENS).view(1, 1, 1, TOKENS) >= lengths.view(BATCH, 1, 1, 1)
    return causal_mask(dtype).masked_fill(padded, torch.finfo(dtype).min)


MASKS = {"none": lambda: None, "causal": causal_mask, "causal+padding": causal_padding_mask}


def naive_float64(q, k, v, heads, mask=None):
    """softmax(q·kᵀ/√d + mask)·v written out per head, in float64."""
    batch, tokens, width = q.shape
    d = width // heads
    out = torch.empty(batch, tokens, width, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            qh, kh, vh = (t[b, :, cols].double() for t in (q, k, v))
            scores = qh @ kh.T / math.sqrt(d)
            if mask is not None:
                m = mask.double()
                scores = scores + m[b if m.shape[0] > 1 else 0, 0]
            weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            out[b, :, cols] = (weights / weights.sum(dim=-1, keepdim=True)) @ vh
    return out


def backends_to_test():
    params = []
    for name in ("sdpa", "bmm", "split", "basic", "xformers"):
        marks = []
        if name == "xformers":
            marks = [pytest.mark.skipif(
                not (torch.cuda.is_available() and attention._xformers_importable()),
                reason="xformers needs CUDA and the xformers package (pip install 'textenc[xformers]')")]
        elif name not in available_backends("cpu"):
            marks = [pytest.mark.skip(reason=f"{name} not available on this machine")]
        params.append(pytest.param(name, marks=marks))
    return params


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("heads", [1, 4, 12])
def test_basic_matches_float64_formula(heads, mask_name):
    q, k, v = qkv(heads)
    mask = MASKS[mask_name]()
    expected = naive_float64(q, k, v, heads, mask)
    got = attention_basic(q, k, v, heads, mask)
    assert got.dtype == torch.float32
    assert (got.double() - expected).abs().max().item() <= TOL


def test_masks_are_meaningful():
    q, k, v = qkv(4)
    outs = [attention_basic(q, k, v, 4, MASKS[name]()) for name in MASKS]
    assert (outs[0] - outs[1]).abs().max() > 0.1
    assert (outs[1] - outs[2]).abs().max() > 0.1
    # Causal: row 0 sees only key 0, so it is exactly v's row 0.
    torch.testing.assert_close(outs[1][:, 0], v[:, 0])


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("heads", [1, 2, 8, 12])
def test_backend_matches_basic(backend, mask_name, heads):
    device = "cuda" if backend == "xformers" else "cpu"
    q, k, v = (t.to(device) for t in qkv(heads))
    mask = MASKS[mask_name]()
    mask = None if mask is None else mask.to(device)
    function = optimized_attention_for_device(device, mask=mask is not None, backend=backend)
    assert function is attention.ATTENTION_BACKENDS[backend]
    got = function(q, k, v, heads, mask)
    expected = attention_basic(q, k, v, heads, mask)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("query_chunk", [1, 5, 32, 76, 77, 500])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_split_small_query_chunks(query_chunk, mask_name):
    q, k, v = qkv(4)
    mask = MASKS[mask_name]()
    got = attention_split(q, k, v, 4, mask, query_chunk=query_chunk)
    assert (got - attention_basic(q, k, v, 4, mask)).abs().max().item() <= TOL


def test_three_dimensional_mask_is_per_batch():
    q, k, v = qkv(2)
    mask = causal_padding_mask()[:, 0]  # (B, T, T)
    for backend in ("sdpa", "bmm", "split"):
        got = attention.ATTENTION_BACKENDS[backend](q, k, v, 2, mask)
        assert (got - attention_basic(q, k, v, 2, mask[:, None])).abs().max().item() <= TOL


def test_bad_shapes_raise():
    q = torch.randn(1, 5, 10)
    with pytest.raises(ValueError, match="divisible"):
        attention_basic(q, q, q, 3)
    with pytest.raises(ValueError):
        attention_basic(q[0], q[0], q[0], 2)


# --- selection -------------------------------------------------------------

@pytest.fixture
def facts(monkeypatch):
    """Set what the machine has; the env var starts unset."""
    monkeypatch.delenv(ENV_VAR, raising=False)

    def set_facts(*, xformers: bool, sdpa: bool = True, threads: int = 1):
        monkeypatch.setattr(attention, "_xformers_importable", lambda: xformers)
        monkeypatch.setattr(attention, "_sdpa_present", lambda: sdpa)
        monkeypatch.setattr(attention, "_cpu_threads", lambda: threads)
    return set_facts


def chosen(device, **kwargs) -> str:
    function = optimized_attention_for_device(device, **kwargs)
    return {f: n for n, f in attention.ATTENTION_BACKENDS.items()}[function]


@pytest.mark.parametrize("device, xformers, sdpa, small_input, expected", [
    ("cpu", True, True, False, "sdpa"),
    ("cpu", False, False, False, "split"),
    ("cuda", True, True, False, "xformers"),
    ("cuda", True, True, True, "sdpa"),      # CLIP text: short sequences
    ("cuda", False, True, False, "sdpa"),
    ("cuda", False, False, False, "split"),
    ("cuda", True, False, True, "split"),
    ("mps", True, True, False, "sdpa"),      # xformers is CUDA-only
    ("mps", False, False, False, "split"),
])
def test_automatic_choice(facts, device, xformers, sdpa, small_input, expected):
    facts(xformers=xformers, sdpa=sdpa)
    assert chosen(device, mask=True, small_input=small_input) == expected
    assert select_backend(torch.device(device).type, small_input=small_input,
                          xformers_available=xformers, sdpa_available=sdpa) == expected


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("device, small_input, dtype, tokens, threads, expected", [
    ("cpu", True, F32, 77, 1, "bmm"),            # CLIP text on CPU
    ("cpu", True, F32, 77, attention.BMM_MAX_THREADS, "bmm"),
    ("cpu", True, F32, 77, attention.BMM_MAX_THREADS + 1, "sdpa"),  # the flash kernel's parallel loop
    ("cpu", True, F32, attention.BMM_MAX_TOKENS, 1, "bmm"),
    ("cpu", True, F32, attention.BMM_MAX_TOKENS + 1, 1, "sdpa"),
    ("cpu", True, F32, 257, 1, "sdpa"),          # CLIP vision: the flash kernel wins
    ("cpu", True, BF16, 77, 1, "sdpa"),          # bf16: the flash kernel wins
    ("cpu", True, None, None, 1, "sdpa"),        # facts unknown: keep SDPA
    ("cpu", False, F32, 77, 1, "sdpa"),
    ("cuda", True, F32, 77, 1, "sdpa"),
    ("mps", True, F32, 77, 1, "sdpa"),
])
def test_short_fp32_cpu_sequences_choose_bmm(facts, device, small_input, dtype, tokens, threads,
                                             expected):
    facts(xformers=True, threads=threads)
    kwargs = {"small_input": small_input, "dtype": dtype, "tokens": tokens}
    assert chosen(device, **kwargs) == expected
    assert select_backend(device, xformers_available=True, threads=threads, **kwargs) == expected


def test_bmm_gradients_match_basic():
    """With autograd on, bmm copies each sequence's result in (out= records no
    gradient): its gradients equal the reference's."""
    grads = {}
    for name in ("bmm", "basic"):
        q, k, v = (t.requires_grad_() for t in qkv(4))
        out = attention.ATTENTION_BACKENDS[name](q, k, v, 4, causal_padding_mask())
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads[name] = (out.detach(), q.grad, k.grad, v.grad)
    for got, expected in zip(grads["bmm"], grads["basic"]):
        assert (got - expected).abs().max().item() <= TOL


def test_available_backends(facts):
    facts(xformers=True)
    assert available_backends("cuda") == ["xformers", "sdpa", "bmm", "split", "basic"]
    assert available_backends("cpu") == ["sdpa", "bmm", "split", "basic"]
    assert available_backends("mps") == ["sdpa", "bmm", "split", "basic"]
    facts(xformers=False, sdpa=False)
    assert available_backends("cuda") == ["bmm", "split", "basic"]


def test_env_var_is_honoured(facts, monkeypatch):
    facts(xformers=False)
    for value, expected in (("split", "split"), ("basic", "basic"), (" SDPA ", "sdpa"),
                            ("auto", "sdpa"), ("", "sdpa")):
        monkeypatch.setenv(ENV_VAR, value)
        assert chosen("cpu") == expected


def test_argument_overrides_env_var(facts, monkeypatch):
    facts(xformers=False)
    monkeypatch.setenv(ENV_VAR, "split")
    assert chosen("cpu", backend="basic") == "basic"
    assert chosen("cpu", backend="auto") == "sdpa"
    monkeypatch.setenv(ENV_VAR, "xformers")  # would raise on cpu if it were read
    assert chosen("cpu", backend="split") == "split"
    monkeypatch.setenv(ENV_VAR, "no-such-backend")
    assert chosen("cpu", backend="sdpa") == "sdpa"


@pytest.mark.parametrize("source", ["argument", "env"])
def test_unknown_backend_raises(facts, monkeypatch, source):
    facts(xformers=True)
    if source == "env":
        monkeypatch.setenv(ENV_VAR, "flash")
        call = functools.partial(optimized_attention_for_device, "cpu")
    else:
        call = functools.partial(optimized_attention_for_device, "cpu", backend="flash")
    with pytest.raises(BackendUnavailableError, match="flash") as info:
        call()
    assert "sdpa" in str(info.value)  # lists the valid names


@pytest.mark.parametrize("device, importable", [("cpu", True), ("mps", True), ("cuda", False)])
@pytest.mark.parametrize("source", ["argument", "env"])
def test_explicit_xformers_that_cannot_run_raises(facts, monkeypatch, device, importable, source):
    facts(xformers=importable)
    kwargs = {"backend": "xformers"}
    if source == "env":
        monkeypatch.setenv(ENV_VAR, "xformers")
        kwargs = {}
    with pytest.raises(BackendUnavailableError) as info:
        optimized_attention_for_device(device, **kwargs)
    message = str(info.value)
    assert ("backend='xformers'" if source == "argument" else "$TEXTENC_ATTENTION=xformers") in message
    if device == "cuda":  # installing it is the fix
        assert "xformers is not installed (device 'cuda')" in message and "pip install" in message
    else:  # installing it would not help: the device is the problem (issue 16.11)
        assert f"xformers runs only on CUDA devices and this device is {device!r}" in message
        assert "pip install" not in message
    assert "accepted values: auto, xformers, sdpa, bmm, split, basic" in message
    assert "on this device use one of auto, sdpa, bmm, split, basic" in message


def test_errors_name_the_real_device_and_every_accepted_value(facts, monkeypatch):
    facts(xformers=False)
    with pytest.raises(BackendUnavailableError, match="device 'cuda:1'"):
        select_backend("cuda", override="xformers", device_name="cuda:1")
    monkeypatch.setenv(ENV_VAR, "flash")
    with pytest.raises(BackendUnavailableError) as info:
        optimized_attention_for_device("cpu")
    assert "'flash' ($TEXTENC_ATTENTION=flash)" in str(info.value)
    assert "accepted values are auto, xformers, sdpa, bmm, split, basic" in str(info.value)


def test_explicit_sdpa_without_torch_support_raises(facts):
    facts(xformers=False, sdpa=False)
    with pytest.raises(BackendUnavailableError, match="torch"):
        optimized_attention_for_device("cpu", backend="sdpa")


def test_explicit_xformers_on_cuda_when_importable(facts):
    facts(xformers=True)
    assert chosen("cuda", backend="xformers", small_input=True) == "xformers"


def test_nothing_probed_at_import():
    """Importing textenc.nn.attention neither imports xformers nor looks for it."""
    code = (
        "import importlib.util, sys\n"
        "calls = []\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a, **k: (calls.append(name), real(name, *a, **k))[1]\n"
        "import textenc.nn.attention, textenc.nn.clip_model\n"
        "assert 'xformers' not in sys.modules, 'xformers imported'\n"
        "assert 'xformers' not in calls, calls\n"
        "textenc.nn.attention.optimized_attention_for_device('cpu')\n"
        "assert 'xformers' not in sys.modules, 'xformers imported for cpu'\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_doctests():
    result = doctest.testmod(attention, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
