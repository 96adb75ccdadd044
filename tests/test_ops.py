"""textenc.nn.ops: init-free layers and the manual-cast namespace.

References are torch's own layers/functionals on the same tensors.
"""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F

from textenc.nn import ops

NAMESPACES = [ops.disable_weight_init, ops.manual_cast]


def build_all(namespace, dtype=torch.float32):
    return {
        "Linear": namespace.Linear(6, 4, dtype=dtype),
        "Conv2d": namespace.Conv2d(3, 5, kernel_size=2, stride=2, bias=True, dtype=dtype),
        "LayerNorm": namespace.LayerNorm(6, eps=1e-5, dtype=dtype),
        "Embedding": namespace.Embedding(10, 6, dtype=dtype),
    }


def fill_(layers: dict, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))


INPUTS = {
    "Linear": lambda: torch.randn(2, 3, 6),
    "Conv2d": lambda: torch.randn(2, 3, 4, 4),
    "LayerNorm": lambda: torch.randn(2, 3, 6) * 3 + 1,
    "Embedding": lambda: torch.tensor([[0, 3, 9], [1, 1, 2]]),
}


def reference(name: str, layer, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight.float()
    b = None if getattr(layer, "bias", None) is None else layer.bias.float()
    if name == "Linear":
        return x @ w.T + b
    if name == "Conv2d":
        return F.conv2d(x, w, b, stride=2)
    if name == "LayerNorm":
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * w + b
    return w[x]


@pytest.mark.parametrize("namespace", NAMESPACES, ids=lambda n: n.__name__)
def test_construction_never_randomises(monkeypatch, namespace):
    def forbidden(*args, **kwargs):
        raise AssertionError("weight initialisation ran during construction")

    for name in ("kaiming_uniform_", "uniform_", "normal_", "xavier_uniform_",
                 "trunc_normal_", "ones_", "zeros_"):
        monkeypatch.setattr(torch.nn.init, name, forbidden)
    monkeypatch.setattr(torch.Tensor, "uniform_", forbidden)
    monkeypatch.setattr(torch.Tensor, "normal_", forbidden)
    layers = build_all(namespace, dtype=torch.float16)
    assert layers["Linear"].weight.shape == (4, 6)
    assert layers["Conv2d"].weight.shape == (5, 3, 2, 2)
    assert layers["Embedding"].weight.shape == (10, 6)
    for layer in layers.values():
        assert all(p.dtype == torch.float16 for p in layer.parameters())


@pytest.mark.parametrize("namespace", NAMESPACES, ids=lambda n: n.__name__)
@pytest.mark.parametrize("name", list(INPUTS))
def test_forward_matches_torch(namespace, name):
    layers = build_all(namespace)
    fill_(layers)
    x = INPUTS[name]()
    out = layers[name](x)
    torch.testing.assert_close(out, reference(name, layers[name], x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(INPUTS))
def test_manual_cast_computes_fp16_weights_in_fp32(name):
    layers = build_all(ops.manual_cast, dtype=torch.float16)
    fill_(layers, seed=1)
    layer = layers[name]
    stored = {n: (p.data_ptr(), p.dtype) for n, p in layer.named_parameters()}
    x = INPUTS[name]()
    out = layer(x, out_dtype=torch.float32) if name == "Embedding" else layer(x)
    assert out.dtype == torch.float32
    # fp16 -> fp32 is exact, so the result equals fp32 compute on the stored values.
    torch.testing.assert_close(out, reference(name, layer, x), rtol=1e-5, atol=1e-5)
    # The stored fp16 weights are untouched and no fp32 copy is kept around.
    assert {n: (p.data_ptr(), p.dtype) for n, p in layer.named_parameters()} == stored
    assert list(layer.buffers()) == []
    assert not [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    assert all(t.dtype == torch.float16 for t in layer.state_dict().values())


def test_disable_weight_init_does_not_cast():
    layer = ops.disable_weight_init.Linear(4, 2, dtype=torch.float16)
    with pytest.raises(RuntimeError):
        layer(torch.ones(1, 4))


@pytest.mark.parametrize("namespace", NAMESPACES, ids=lambda n: n.__name__)
def test_module_to_still_works(namespace):
    for layer in build_all(namespace).values():
        assert type(layer)._apply is torch.nn.Module._apply
        layer.to(torch.float64)
        assert all(p.dtype == torch.float64 for p in layer.parameters())
        layer.half()
        assert all(p.dtype == torch.float16 for p in layer.parameters())


@pytest.mark.parametrize("namespace", NAMESPACES, ids=lambda n: n.__name__)
def test_embedding_out_dtype(namespace):
    layer = namespace.Embedding(10, 4, dtype=torch.float16)
    fill_({"e": layer})
    ids = torch.tensor([[2, 7, 2]])
    assert layer(ids).dtype == torch.float16
    for dtype in (torch.float32, torch.bfloat16):
        out = layer(ids, out_dtype=dtype)
        assert out.dtype == dtype
        torch.testing.assert_close(out, layer.weight[ids].to(dtype), rtol=0, atol=0)


def test_namespaces_flip_one_flag():
    for label in ("Linear", "Conv2d", "LayerNorm", "Embedding"):
        assert getattr(ops.disable_weight_init, label).cast_weights is False
        assert getattr(ops.manual_cast, label).cast_weights is True
        assert issubclass(getattr(ops.manual_cast, label), getattr(torch.nn, label))


def test_cast_to():
    t = torch.ones(3)
    assert ops.cast_to(t) is t
    assert ops.cast_to(t, dtype=torch.float32, device="cpu") is t
    half = ops.cast_to(t, dtype=torch.float16)
    assert half.dtype == torch.float16 and t.dtype == torch.float32
    assert ops.cast_to(None, dtype=torch.float16) is None


def test_pick_operations():
    assert ops.pick_operations(torch.float16, torch.float16) is ops.disable_weight_init
    assert ops.pick_operations(torch.float16, torch.float32) is ops.manual_cast


def test_doctests():
    result = doctest.testmod(ops, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
