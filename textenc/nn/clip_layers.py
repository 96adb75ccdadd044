"""The transformer blocks CLIP's text and vision towers share.

Attention, MLP, one pre-norm layer and the layer stack (with intermediate
outputs), under Hugging Face's parameter names; :mod:`textenc.nn.clip_model`
builds the text and vision models from them and re-exports these names, as
ComfyUI's ``comfy.clip_model`` has them. Every module takes ``dtype``,
``device`` and an ``operations`` namespace (see :mod:`textenc.nn.ops`) and holds
no global state; the attention backend is chosen per call by
:func:`textenc.nn.attention.optimized_attention_for_device`.

Inference without autograd takes in-place and buffer-reusing paths (same
bits, fewer allocations); with autograd on, every op is out of place.

Shapes in comments: B batch, T tokens, D width, H heads.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

from . import ops
from .attention import optimized_attention_for_device
from ..errors import ConfigError

__all__ = [
    "ACTIVATION_FUNCTIONS", "INPLACE_ACTIVATIONS", "IntermediateSpec",
    "CLIPAttention", "CLIPMLP", "CLIPLayer", "CLIPEncoder", "group_spans", "resolve_layer_index",
]

IntermediateSpec = Union[int, str, None]


def _autograd(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU (constant 1.702 from the CLIP repo).
    return x * torch.sigmoid(1.702 * x)


#: Elements per chunk of the in-place quick_gelu on CPU: 512 KiB of fp32, so the
#: sigmoid temporary stays in L2 cache instead of streaming (B, T, 4D) through
#: memory three times (64 Ki-element chunks measured 5-25% slower: more calls).
QUICK_GELU_CHUNK = 1 << 17


def _quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    # Bit-identical to _quick_gelu (silu(1.702x)/1.702 would need no temporary but
    # differs by an ulp, which breaks 1e-5 parity at |x| ~ 50).
    if x.device.type != "cpu" or not x.is_contiguous() or x.numel() <= QUICK_GELU_CHUNK:
        return (x * 1.702).sigmoid_().mul_(x)
    # A 0-dim fp32 tensor is the same float(1.702) as the Python scalar but is
    # not re-wrapped into a tensor on every chunk (~25% of this loop's time).
    # Other dtypes keep the scalar (float64 would compute with float32(1.702)).
    scale = torch.tensor(1.702, dtype=torch.float32) if x.dtype == torch.float32 else 1.702
    flat = x.view(-1, x.shape[-1])
    rows = max(1, QUICK_GELU_CHUNK // x.shape[-1])
    scratch = torch.empty((rows, x.shape[-1]), dtype=x.dtype)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows]
        sigmoid = scratch[: chunk.shape[0]]
        torch.mul(chunk, scale, out=sigmoid).sigmoid_()
        chunk.mul_(sigmoid)  # x·σ(1.702x): same product, same bits as σ·x
    return x


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(x)


def _gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(x, approximate="tanh")


ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
#: In-place versions for inference on a temporary the caller owns (fc1's
#: output). A fresh (B, T, 4D) buffer costs page faults on every forward: the
#: out-of-place quick_gelu was 10% of a batch-16 CLIP-L forward.
INPLACE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu_,
    "gelu": _gelu_,
    "gelu_pytorch_tanh": _gelu_tanh_,
}


def _residual(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    # x + delta; without autograd, written into delta (a temporary of this layer)
    # to skip allocating a new (B, T, D) buffer. Addition commutes: same bits.
    return x + delta if _autograd(x) or _autograd(delta) else delta.add_(x)


class CLIPAttention(torch.nn.Module):
    """Multi-head self-attention with separate q/k/v projections (HF layout).

    q/k/v stay three matmuls: fusing them into one (3D, D) matmul measured no
    gain on CPU (batch 1/4/16, CLIP-L, single thread, CPU time within 2%).
    """

    def __init__(self, embed_dim: int, heads: int, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__()
        self.heads = heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, operations.Linear(embed_dim, embed_dim, bias=True,
                                                  dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, optimized_attention,
                *, queries: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        # x: (B, T, D) keys/values source; queries: optional (B, Tq, D) subset of rows.
        q = self.q_proj(x if queries is None else queries)
        k = self.k_proj(x)
        v = self.v_proj(x)
        return self.out_proj(optimized_attention(q, k, v, self.heads, mask, causal=causal))


class CLIPMLP(torch.nn.Module):
    """fc1 → activation → fc2."""

    def __init__(self, embed_dim: int, intermediate_size: int, activation: str,
                 dtype=None, device=None, operations=ops.disable_weight_init) -> None:
        super().__init__()
        self.fc1 = operations.Linear(embed_dim, intermediate_size, bias=True, dtype=dtype, device=device)
        self.activation = ACTIVATION_FUNCTIONS[activation]
        self.activation_ = INPLACE_ACTIVATIONS[activation]
        self.fc2 = operations.Linear(intermediate_size, embed_dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, scratch: _Scratch | None = None) -> torch.Tensor:
        """``scratch`` (inference only) lends fc1's (…, 4D) output buffer."""
        # out= ops record no gradients: the buffer is only for no-grad calls.
        if scratch is None or torch.is_grad_enabled() or not ops.accepts_out(self.fc1) \
                or not x.is_contiguous():
            h = self.fc1(x)
            return self.fc2(self.activation(h) if _autograd(h) else self.activation_(h))
        h = scratch.take((*x.shape[:-1], self.fc1.out_features), x.dtype, x.device)
        return self.fc2(self.activation_(self.fc1(x, out=h)))


class _Scratch:
    """Buffers one forward call reuses across its layers (CPU inference only).

    Every layer's fc1 output has the same shape; allocating it once per forward
    instead of once per layer stops glibc from handing the freed block back to
    the OS and page-faulting it in again on the next layer (45k minor faults,
    ~4% of a batch-16 CLIP-L forward). Each call makes its own instance, so
    nothing is shared between calls or threads.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        key = (shape, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buffer


def _select_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # x: (B, T, ...) ; rows: (B,) -> (B, 1, ...)
    return x[torch.arange(x.shape[0], device=x.device), rows].unsqueeze(1)


class CLIPLayer(torch.nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, embed_dim: int, heads: int, intermediate_size: int,
                 intermediate_activation: str, layer_norm_eps: float = 1e-5,
                 dtype=None, device=None, operations=ops.disable_weight_init) -> None:
        super().__init__()
        self.layer_norm1 = operations.LayerNorm(embed_dim, eps=layer_norm_eps, dtype=dtype, device=device)
        self.self_attn = CLIPAttention(embed_dim, heads, dtype, device, operations)
        self.layer_norm2 = operations.LayerNorm(embed_dim, eps=layer_norm_eps, dtype=dtype, device=device)
        self.mlp = CLIPMLP(embed_dim, intermediate_size, intermediate_activation, dtype, device, operations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, optimized_attention,
                *, rows: torch.Tensor | None = None, causal: bool = False,
                scratch: _Scratch | None = None) -> torch.Tensor:
        """Run the block; with ``rows`` (B,) only that row of each sequence is computed.

        ``causal`` blocks keys after each query (on top of ``mask``). ``rows``
        assumes causal attention (``mask`` causal, or ``causal=True``):
        computing one query row is then exact, the row still attends to every
        key it can see, and no later layer needs the other rows.
        """
        h = self.layer_norm1(x)
        if rows is None:
            x = _residual(x, self.self_attn(h, mask, optimized_attention, causal=causal))
        else:
            x = _residual(_select_rows(x, rows), self._attend_rows(h, mask, optimized_attention, rows))
        return _residual(x, self.mlp(self.layer_norm2(x), scratch))

    def _attend_rows(self, h: torch.Tensor, mask: torch.Tensor | None, optimized_attention,
                     rows: torch.Tensor) -> torch.Tensor:
        # h: (B, T, D); rows: (B,). Keys after the last queried row are blocked for
        # every query, so only the first `keys` rows need k and v.
        batch, tokens = h.shape[:2]
        keys = min(int(rows.max()) + 1, tokens)
        if mask is not None:
            # (B|1, 1, T, T) -> (B, 1, 1, keys): the mask row of each query.
            full = mask.expand(batch, *mask.shape[1:])
            mask = full[torch.arange(batch, device=h.device), :, rows].unsqueeze(2)[..., :keys]
        else:
            blocked = torch.arange(keys, device=h.device) > rows.view(batch, 1)
            mask = torch.zeros(blocked.shape, dtype=h.dtype, device=h.device).masked_fill_(
                blocked, torch.finfo(h.dtype).min).view(batch, 1, 1, keys)
        return self.self_attn(h[:, :keys], mask, optimized_attention, queries=_select_rows(h, rows))


def group_spans(row_groups: Sequence[int], batch: int) -> list[tuple[int, int]]:
    """Group sizes → ``[(start, stop), ...]`` covering ``batch`` rows (ConfigError otherwise)."""
    sizes = [int(size) for size in row_groups]
    if any(size < 1 for size in sizes) or sum(sizes) != batch:
        raise ConfigError(f"row_groups {sizes} must be positive sizes summing to the batch ({batch})")
    stops = list(itertools.accumulate(sizes))
    return list(zip([0] + stops[:-1], stops))


def _tail_by_group(layer: CLIPLayer, x: torch.Tensor, mask: torch.Tensor | None, attention,
                   rows: torch.Tensor, row_groups: Sequence[int], **kwargs) -> torch.Tensor:
    def group_mask(start: int, stop: int):
        return mask if mask is None or mask.shape[0] == 1 else mask[start:stop]

    return torch.cat([layer(x[start:stop], group_mask(start, stop), attention, rows=rows[start:stop], **kwargs)
                      for start, stop in group_spans(row_groups, x.shape[0])])


def resolve_layer_index(spec: IntermediateSpec, num_layers: int) -> int | str | None:
    """Turn a layer spec into a 0-based index (negative counts from the end) or ``"all"``."""
    if spec is None or spec == "all":
        return spec
    if isinstance(spec, bool) or not isinstance(spec, int) or not -num_layers <= spec < num_layers:
        raise ConfigError(f"intermediate layer {spec!r} is out of range for a "
                         f"{num_layers}-layer encoder (use -{num_layers}..{num_layers - 1} or 'all')")
    return spec % num_layers


class CLIPEncoder(torch.nn.Module):
    """A stack of :class:`CLIPLayer` that can also return one (or every) intermediate output."""

    def __init__(self, num_layers: int, embed_dim: int, heads: int, intermediate_size: int,
                 intermediate_activation: str, layer_norm_eps: float = 1e-5,
                 dtype=None, device=None, operations=ops.disable_weight_init) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([
            CLIPLayer(embed_dim, heads, intermediate_size, intermediate_activation,
                      layer_norm_eps, dtype, device, operations)
            for _ in range(num_layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                intermediate_output: IntermediateSpec = None, *,
                tail_rows: torch.Tensor | None = None,
                row_groups: Sequence[int] | None = None,
                attention_backend: str | None = None,
                causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(last, intermediate)``.

        ``intermediate`` is the output of layer ``intermediate_output`` (0-based;
        negative from the end), all layers stacked as (B, layers, T, D) for
        ``"all"``, or None. With ``tail_rows`` (B,), the last layer computes only
        those rows and ``last`` is (B, 1, D) (this needs causal attention:
        ``causal=True`` or a causal ``mask``). ``row_groups`` (sizes summing to
        B) runs that one-row tail group by group, with the shapes each group
        would have alone: CPU matmul kernels round a 1-2 row product differently
        from a larger one, so a batch of captions then equals each caption
        encoded by itself bit for bit. ``causal`` blocks keys after each query
        on top of ``mask``.
        """
        attention = optimized_attention_for_device(
            x.device, mask=mask is not None, small_input=True, backend=attention_backend,
            dtype=x.dtype, tokens=x.shape[1])
        index = resolve_layer_index(intermediate_output, len(self.layers))
        collected: list[torch.Tensor] = []
        intermediate = None
        last = len(self.layers) - 1
        scratch = _Scratch() if x.device.type == "cpu" else None
        for i, layer in enumerate(self.layers):
            rows = tail_rows if i == last and index != last else None
            if rows is not None and row_groups is not None:
                x = _tail_by_group(layer, x, mask, attention, rows, row_groups, causal=causal, scratch=scratch)
            else:
                x = layer(x, mask, attention, rows=rows, causal=causal, scratch=scratch)
            if index == "all":
                collected.append(x)
            elif i == index:
                intermediate = x
        if index == "all":
            intermediate = torch.stack(collected, dim=1)
        return x, intermediate
