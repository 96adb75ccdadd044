"""Layer classes that skip weight initialisation, grouped as injectable namespaces.

Model code never names ``torch.nn.Linear`` directly: it receives an
``operations`` namespace and builds ``operations.Linear(..., dtype=, device=)``.
Two namespaces are provided:

* :class:`disable_weight_init` — construction allocates parameters but never
  randomises them (weights always come from a checkpoint, so initialising
  them would only cost time).
* :class:`manual_cast` — the same layers, but each forward casts the stored
  weight and bias to the input's dtype and device. An fp16 checkpoint can then
  compute in fp32 on CPU without a second full-precision copy of the weights.

The casting is written once, in :class:`CastWeightBiasMixin`; each layer class
only says which functional op it applies.

Casting every weight on every forward costs time (an fp16 CLIP-L computing in
fp32 re-reads 246 MB and writes 492 MB per call). :func:`cache_weight_casts`
opts a model into keeping each cast between calls: faster, at the price of
holding the compute-dtype copy too (fp16 weights + fp32 cache = 3x the fp16
size, 1.5x an fp32 checkpoint). It is off by default because the point of
``manual_cast`` is to keep memory at the checkpoint's precision.

>>> import torch
>>> layer = manual_cast.Linear(4, 2, dtype=torch.float16)
>>> _ = torch.nn.init.ones_(layer.weight), torch.nn.init.zeros_(layer.bias)
>>> layer(torch.ones(1, 4)).dtype
torch.float32
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from textenc.nn import gemm
from textenc.nn.packed import PackedWeight
from textenc.nn.scratch import can_cast_into_buffer, cast_into_buffer

__all__ = [
    "CastWeightBiasMixin",
    "disable_weight_init",
    "manual_cast",
    "cast_to",
    "accepts_out",
    "cache_weight_casts",
    "pick_operations",
]

#: Cast copies one layer keeps at most (weight and bias, for a few dtypes or devices).
_CAST_CACHE_ENTRIES = 8


def cast_to(
    tensor: torch.Tensor | None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Return ``tensor`` in ``dtype`` on ``device``, without copying when it already is."""
    if tensor is None:
        return None
    if (dtype is None or tensor.dtype == dtype) and (
        device is None or tensor.device == torch.device(device)
    ):
        return tensor
    return tensor.to(device=device, dtype=dtype, non_blocking=True)


class CastWeightBiasMixin:
    """Shared ``forward`` for init-free layers, optionally casting parameters.

    Subclasses implement ``_forward_op(input, weight, bias)`` with the functional op.
    When ``cast_weights`` is true the stored parameters are cast to the input's
    dtype and device on every call (one cast per layer per forward); the stored
    copy is never replaced, so memory stays at the checkpoint's precision.
    """

    cast_weights: bool = False
    #: Keep casts between forwards (see :func:`cache_weight_casts`).
    cache_casts: bool = False

    def reset_parameters(self) -> None:
        # Weights always come from a checkpoint; randomising them is wasted work.
        return None

    def _cast_target(self, input: torch.Tensor) -> torch.dtype:
        return input.dtype

    def forward(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weight = getattr(self, "weight", None)
        bias = getattr(self, "bias", None)
        if self.cast_weights or isinstance(weight, PackedWeight):
            # A packed weight (scaled fp8, GGUF) is decoded to the compute dtype here,
            # per call, and never kept: memory stays at the file's size.
            dtype = self._cast_target(input)
            weight = self._cast_weight(weight, dtype, input.device)
            bias = self._cast(bias, dtype, input.device)
        return self._forward_op(input, weight, bias, *args, **kwargs)

    def clear_cast_cache(self) -> None:
        """Drop the casts kept by :attr:`cache_casts` (the next forward casts again)."""
        self.__dict__.pop("_cast_cache", None)

    def _cast_weight(self, weight: torch.Tensor | None, dtype: torch.dtype, device) -> torch.Tensor | None:
        """The weight's cast: into the thread's reused buffer inside
        :func:`~textenc.nn.scratch.reuse_cast_buffer` (CPU, not cached), else :meth:`_cast`.
        The bias never shares the buffer: both are alive in the same op."""
        needs_cast = weight is not None and (isinstance(weight, PackedWeight) or weight.dtype != dtype)
        if (needs_cast and not self.cache_casts and torch.device(device).type == "cpu"
                and can_cast_into_buffer(weight)):
            return cast_into_buffer(weight, dtype)
        return self._cast(weight, dtype, device)

    def _cast(self, tensor: torch.Tensor | None, dtype: torch.dtype, device) -> torch.Tensor | None:
        if isinstance(tensor, PackedWeight):
            return tensor.decode(dtype, device)
        if not self.cache_casts or tensor is None or (tensor.dtype == dtype and tensor.device == device):
            return cast_to(tensor, dtype=dtype, device=device)
        # Keyed by storage address and shape, checked against the version
        # counter: an in-place update or a newly assigned weight misses.
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), dtype, device)
        cache = self.__dict__.setdefault("_cast_cache", {})
        version = _version(tensor)
        hit = cache.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        if len(cache) >= _CAST_CACHE_ENTRIES:
            cache.clear()
        cast = cast_to(tensor, dtype=dtype, device=device)
        cache[key] = (version, cast)
        return cast


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors carry no version counter
        return -1


def cache_weight_casts(module: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Opt ``module``'s casting layers in (or out) of caching cast weights.

    With ``enabled`` each layer keeps its weights cast to the last compute
    dtype/device it saw, so only the first forward pays for the cast. Memory:
    the cast copies stay alive (fp16 storage computing in fp32 holds 3x the
    fp16 size). Disabling drops the copies. Returns ``module``.

    >>> layer = manual_cast.Linear(4, 2, dtype=torch.float16)
    >>> _ = torch.nn.init.ones_(layer.weight), torch.nn.init.zeros_(layer.bias)
    >>> _ = cache_weight_casts(layer)
    >>> first, second = layer(torch.ones(1, 4)), layer(torch.ones(1, 4))
    >>> len(layer._cast_cache), second.dtype
    (2, torch.float32)
    """
    for layer in module.modules():
        if isinstance(layer, CastWeightBiasMixin):
            layer.cache_casts = enabled
            layer.clear_cast_cache()
    return module


class _Linear(CastWeightBiasMixin, torch.nn.Linear):
    """Linear; ``layer(input, out=buffer)`` writes into a caller-owned buffer."""

    def _forward_op(self, input, weight, bias, out: torch.Tensor | None = None):
        # F.linear's bits; large CPU fp32 products split over the threads (textenc.nn.gemm).
        return gemm.linear(input, weight, bias, out=out)


def accepts_out(layer: torch.nn.Module) -> bool:
    """Whether ``layer(x, out=buffer)`` is safe: one of these Linear layers, with
    its ``forward`` not overridden (a subclass's forward may not pass ``out`` on)."""
    return isinstance(layer, _Linear) and type(layer).forward is CastWeightBiasMixin.forward


class _Conv2d(CastWeightBiasMixin, torch.nn.Conv2d):
    def _forward_op(self, input, weight, bias):
        return self._conv_forward(input, weight, bias)


class _LayerNorm(CastWeightBiasMixin, torch.nn.LayerNorm):
    def _forward_op(self, input, weight, bias):
        return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)


class _Embedding(CastWeightBiasMixin, torch.nn.Embedding):
    """Embedding whose output dtype can be chosen per call (``out_dtype``).

    Token ids are integers, so the cast target is ``out_dtype`` (or the stored
    dtype), never the input's dtype.
    """

    def forward(
        self, input: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        weight = self.weight
        if self.cast_weights:
            weight = cast_to(weight, device=input.device)
        out = F.embedding(input, weight, self.padding_idx, self.max_norm,
                          self.norm_type, self.scale_grad_by_freq, self.sparse)
        return out if out_dtype is None else out.to(out_dtype)

    def _forward_op(self, input, weight, bias):  # pragma: no cover - forward overrides
        raise NotImplementedError


def _namespace(name: str, cast: bool) -> type:
    """Build an operations namespace whose layers share one ``cast_weights`` flag."""
    layers = {}
    for base, label in ((_Linear, "Linear"), (_Conv2d, "Conv2d"),
                        (_LayerNorm, "LayerNorm"), (_Embedding, "Embedding")):
        layers[label] = type(label, (base,), {"cast_weights": cast,
                                              "__module__": __name__,
                                              "__qualname__": f"{name}.{label}"})
    return type(name, (), {**layers, "__module__": __name__,
                           "__doc__": f"Init-free layers (cast_weights={cast})."})


disable_weight_init = _namespace("disable_weight_init", cast=False)
manual_cast = _namespace("manual_cast", cast=True)


def pick_operations(
    weight_dtype: torch.dtype, compute_dtype: torch.dtype
) -> type:
    """The namespace to use when weights are stored in one dtype and computed in another."""
    return disable_weight_init if weight_dtype == compute_dtype else manual_cast
