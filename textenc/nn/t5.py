"""T5 v1.1 and UMT5 encoders as pure ``nn.Module``s, computed as ComfyUI's ``comfy/text_encoders/t5.py``.

Parameter names are Hugging Face transformers' (``shared.weight``,
``encoder.block.N.layer.0.SelfAttention.q.weight``,
``encoder.block.N.layer.1.DenseReluDense.wi_0.weight``,
``encoder.final_layer_norm.weight``), so HF state dicts load as they are. Every
module takes ``dtype``, ``device`` and an ``operations`` namespace (see
:mod:`textenc.nn.ops`) and skips weight initialisation.

What makes T5 differ from CLIP, each as ComfyUI computes it:

* RMS layer norm (no mean, no bias, eps 1e-6) before each sub-block;
* gated-GELU (tanh) feed-forward ``wo(gelu(wi_0 x) * wi_1 x)``; no Linear biases;
* no ``1/sqrt(d_kv)`` in attention: ComfyUI multiplies ``k`` by ``sqrt(d_kv)``
  and calls the standard scaled attention, so the two cancel (exactly when
  ``d_kv`` is a power of 4, as the released 64 is);
* a learned relative position bias added to the scores (32 buckets, max
  distance 128, bidirectional): T5 v1.1 computes it in block 0 and every block
  reuses it; UMT5 has one per block;
* padding blocked by ``-finfo.max`` added to the bias.

Shapes in comments: B batch, T tokens, D d_model, H heads, F d_ff.

>>> cfg = {"vocab_size": 10, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 2, "num_heads": 2}
>>> model = T5(cfg, device="meta")
>>> sorted(model.state_dict())[:2]
['encoder.block.0.layer.0.SelfAttention.k.weight', 'encoder.block.0.layer.0.SelfAttention.o.weight']
"""

from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from . import ops
from .attention import ENV_VAR, optimized_attention_for_device
from .clip_layers import INPLACE_ACTIVATIONS, IntermediateSpec, _autograd, _residual, resolve_layer_index
from .scratch import reuse_cast_buffer
from .t5_config import T5Config, load_t5_config

__all__ = ["T5", "T5Stack", "T5Block", "T5Attention", "T5LayerNorm", "T5DenseGatedActDense",
           "T5DenseActDense", "T5LayerFF", "T5LayerSelfAttention", "T5Output", "relative_position_bucket", "attention_mask_bias"]

#: Dtypes whose embedding rows need no NaN guard (ComfyUI applies ``nan_to_num`` for any other, i.e. fp8).
_PLAIN_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": lambda a: F.gelu(a, approximate="tanh"),
    "gelu_new": lambda a: F.gelu(a, approximate="tanh"),  # transformers' name for the same function
    "relu": F.relu,
}
#: The same functions in place, for a temporary the caller owns when autograd is off.
_INPLACE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": INPLACE_ACTIVATIONS["gelu_pytorch_tanh"],
    "gelu_new": INPLACE_ACTIVATIONS["gelu_pytorch_tanh"],
    "relu": torch.relu_,
}


class T5LayerNorm(torch.nn.Module):
    """RMS norm: ``weight * x / sqrt(mean(x²) + eps)``; no mean subtraction, no bias.

    The mean of squares is taken in fp32 whatever the compute dtype (as
    transformers does): T5 activations reach 1e3-1e4 in real models.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None, device=None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        variance = h.pow(2).mean(-1, keepdim=True)
        h = (h * torch.rsqrt(variance + self.variance_epsilon)).to(x.dtype)
        weight = ops.cast_to(self.weight, dtype=h.dtype, device=h.device)
        if _autograd(h) or _autograd(weight):
            return weight * h
        return h.mul_(weight)  # h is this call's temporary; products commute bit for bit


class T5DenseGatedActDense(torch.nn.Module):
    """Gated feed-forward ``wo(act(wi_0 x) * wi_1 x)`` (T5 v1.1, UMT5)."""

    def __init__(self, model_dim: int, ff_dim: int, activation: str, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__()
        self.wi_0 = operations.Linear(model_dim, ff_dim, bias=False, dtype=dtype, device=device)
        self.wi_1 = operations.Linear(model_dim, ff_dim, bias=False, dtype=dtype, device=device)
        self.wo = operations.Linear(ff_dim, model_dim, bias=False, dtype=dtype, device=device)
        self.act = ACTIVATIONS[activation]
        self.act_ = _INPLACE_ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, D) -> (B, T, F) -> (B, T, D)
        gate = self.wi_0(x)
        if _autograd(gate):
            return self.wo(self.act(gate) * self.wi_1(x))
        # Without autograd, in place in wi_0's output (same ops, same bits, no new (B, T, F) buffers).
        return self.wo(self.act_(gate).mul_(self.wi_1(x)))


class T5DenseActDense(torch.nn.Module):
    """Plain feed-forward ``wo(act(wi x))`` (T5 v1.0 layout; ComfyUI supports it too)."""

    def __init__(self, model_dim: int, ff_dim: int, activation: str, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__()
        self.wi = operations.Linear(model_dim, ff_dim, bias=False, dtype=dtype, device=device)
        self.wo = operations.Linear(ff_dim, model_dim, bias=False, dtype=dtype, device=device)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi(x)))


class T5LayerFF(torch.nn.Module):
    """Pre-norm feed-forward sub-block with its residual."""

    def __init__(self, config: T5Config, dtype=None, device=None, operations=ops.disable_weight_init) -> None:
        super().__init__()
        dense = T5DenseGatedActDense if config.is_gated_act else T5DenseActDense
        # "DenseReluDense" is the HF attribute name, kept (even for GELU) so HF state dicts load unchanged.
        self.DenseReluDense = dense(config.d_model, config.d_ff, config.dense_act_fn, dtype, device, operations)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _residual(x, self.DenseReluDense(self.layer_norm(x)))


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of each ``key - query`` offset (Mesh TensorFlow's rule).

    Half the buckets are for keys after the query. Within each half, offsets
    below ``num_buckets // 4`` get a bucket each; larger ones share
    logarithmically wider buckets up to ``max_distance``, beyond which all
    share the last. The float arithmetic is transformers' and ComfyUI's, so
    the bucket edges are theirs.

    >>> relative_position_bucket(torch.tensor([-200, -9, -1, 0, 1, 8, 200])).tolist()
    [15, 8, 1, 0, 17, 24, 31]
    """
    half = num_buckets // 2
    buckets = (relative_position > 0).to(torch.long) * half
    distance = relative_position.abs()
    max_exact = half // 2
    # log(d / max_exact) / log(max_distance / max_exact) of the remaining buckets, truncated
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).to(torch.long)
    large = torch.clamp(large, max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


def attention_mask_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 mask → (B, 1, T, T) additive bias: 0 where a key is kept, ``-finfo.max`` where not.

    ComfyUI's construction (``1 - mask``, then ``masked_fill`` with ``-finfo(dtype).max``).
    """
    batch, tokens = attention_mask.shape
    blocked = 1.0 - attention_mask.to(dtype).reshape(batch, 1, 1, tokens).expand(batch, 1, tokens, tokens)
    return blocked.masked_fill(blocked.to(torch.bool), -torch.finfo(dtype).max)


class T5Attention(torch.nn.Module):
    """Self-attention with T5's unscaled scores and (optionally its own) relative position bias."""

    def __init__(self, config: T5Config, has_relative_bias: bool, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__()
        width, inner = config.d_model, config.inner_dim
        self.q = operations.Linear(width, inner, bias=False, dtype=dtype, device=device)
        self.k = operations.Linear(width, inner, bias=False, dtype=dtype, device=device)
        self.v = operations.Linear(width, inner, bias=False, dtype=dtype, device=device)
        self.o = operations.Linear(inner, width, bias=False, dtype=dtype, device=device)
        self.num_heads = config.num_heads
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.relative_attention_bias = (
            operations.Embedding(self.num_buckets, self.num_heads, dtype=dtype, device=device)
            if has_relative_bias else None)

    def position_bias(self, tokens: int, dtype: torch.dtype, device) -> torch.Tensor:
        """(1, H, T, T) learned bias of each (query, key) offset.

        The bias depends on ``key - query`` only, so it is looked up once per offset
        (2T - 1 rows, not T²) and spread over the diagonals: the same values as
        looking up every (query, key) pair, 13x faster at 256 tokens.
        """
        offsets = torch.arange(1 - tokens, tokens, dtype=torch.long, device=device)  # key - query
        buckets = relative_position_bucket(offsets, self.num_buckets, self.max_distance)
        per_offset = self.relative_attention_bias(buckets, out_dtype=dtype).t().contiguous()  # (H, 2T-1)
        # by_row[h, r, j] = per_offset[h, r + j]; row i of the bias is by_row's row T-1-i
        # (offset j - i), so flipping the rows gives bias[h, i, j] = per_offset[h, j - i + T - 1].
        by_row = per_offset.as_strided((self.num_heads, tokens, tokens), (2 * tokens - 1, 1, 1))
        return by_row.flip(1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, attention) -> torch.Tensor:
        """``x`` (B, T, D); ``bias`` (B|1, H, T, T) position bias plus mask."""
        heads = self.num_heads
        k = self.k(x)
        # Undo the backend's 1/sqrt(d_kv) as ComfyUI does (k * sqrt(d_kv): exact for d_kv = 4**n).
        scale = (k.shape[-1] / heads) ** 0.5
        k = k * scale if _autograd(k) else k.mul_(scale)
        return self.o(attention(self.q(x), k, self.v(x), heads, bias))


class T5LayerSelfAttention(torch.nn.Module):
    """Pre-norm self-attention sub-block with its residual (HF ``layer.0``)."""

    def __init__(self, config: T5Config, has_relative_bias: bool, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_bias, dtype, device, operations)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, dtype, device)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, attention) -> torch.Tensor:
        return _residual(x, self.SelfAttention(self.layer_norm(x), bias, attention))


class T5Block(torch.nn.Module):
    """Self-attention (``layer.0``) then feed-forward (``layer.1``), HF's names."""

    def __init__(self, config: T5Config, has_relative_bias: bool, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__()
        self.layer = torch.nn.ModuleList([T5LayerSelfAttention(config, has_relative_bias, dtype, device, operations),
                                          T5LayerFF(config, dtype, device, operations)])

    @property
    def self_attention(self) -> T5Attention:
        return self.layer[0].SelfAttention

    def forward(self, x: torch.Tensor, bias: torch.Tensor, attention) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias, attention))


def _backend_choice(requested: str | None, x: torch.Tensor) -> str | None:
    """The attention backend T5 asks for: ``requested``, else ``$TEXTENC_ATTENTION``, else, in fp32
    on CPU, ``bmm`` at every length (CLIP gets it up to 128 tokens only).

    ``bmm`` gives ComfyUI's CPU default (``attention_basic``) bit for bit here,
    and attention is about 1% of T5-XXL's work (the 4096 x 10240 feed-forward
    dominates), so the flash kernel's speed at 256-512 tokens would not show.
    """
    if requested is not None or os.environ.get(ENV_VAR, "").strip().lower() not in ("", "auto"):
        return requested
    return "bmm" if x.device.type == "cpu" and x.dtype == torch.float32 else None


class T5Stack(torch.nn.Module):
    """The encoder blocks and the final RMS norm (HF ``encoder.*``)."""

    def __init__(self, config: T5Config, dtype=None, device=None, operations=ops.disable_weight_init) -> None:
        super().__init__()
        per_block = config.model_type == "umt5"
        self.block = torch.nn.ModuleList([T5Block(config, per_block or i == 0, dtype, device, operations)
                                          for i in range(config.num_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, dtype, device)

    @staticmethod
    def _bias(block: T5Block, mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """(B|1, H, T, T): ``block``'s own position bias plus the mask (ComfyUI adds them in this order)."""
        own = block.self_attention.position_bias(x.shape[1], x.dtype, x.device)
        return own if mask is None else mask + own

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                intermediate_output: IntermediateSpec = None, final_layer_norm_intermediate: bool = True,
                *, return_last_hidden: bool = True,
                attention_backend: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``x`` (B, T, D) → ``(last_hidden_state, intermediate)``; see :meth:`T5.forward`."""
        mask = None if attention_mask is None else attention_mask_bias(attention_mask.to(x.device), x.dtype)
        attention = optimized_attention_for_device(x.device, mask=True, small_input=True,
                                                   backend=_backend_choice(attention_backend, x),
                                                   dtype=x.dtype, tokens=x.shape[1])
        index = resolve_layer_index(intermediate_output, len(self.block))
        stop = len(self.block) if return_last_hidden or not isinstance(index, int) else index + 1
        collected: list[torch.Tensor] = []
        intermediate, bias = None, None
        # Casting layers (fp16 / scaled fp8 weights, fp32 compute) reuse one CPU buffer for
        # their weights rather than mapping fresh pages per Linear (see textenc.nn.scratch).
        with reuse_cast_buffer():
            for i, block in enumerate(self.block[:stop]):
                # T5 v1.1: only block 0 has a bias table, and every block reuses its bias (+ mask);
                # UMT5: each block its own.
                if block.self_attention.relative_attention_bias is not None:
                    bias = self._bias(block, mask, x)
                x = block(x, bias, attention)
                if index == "all":
                    collected.append(x)
                elif i == index:
                    intermediate = x
        if index == "all":
            intermediate = torch.stack(collected, dim=1)
        if intermediate is not None and final_layer_norm_intermediate:
            intermediate = self.final_layer_norm(intermediate)
        return (self.final_layer_norm(x) if return_last_hidden else None), intermediate


class T5Output(NamedTuple):
    """Outputs of :class:`T5`; T5 has no pooled output (both pooled fields are None, as in ComfyUI)."""

    last_hidden_state: torch.Tensor | None
    intermediate: torch.Tensor | None
    projected_pooled: None = None
    pooled_output: None = None


class T5(torch.nn.Module):
    """T5 v1.1 / UMT5 encoder (HF ``T5EncoderModel`` / ``UMT5EncoderModel``): ``shared`` + ``encoder``.

    Args:
        config_dict: a :class:`~textenc.nn.t5_config.T5Config`, a bundled name
            (``"t5_xxl"``, ``"umt5_xxl"``), a JSON path or a dict.
        dtype, device: where the parameters are created (``"meta"``: shapes only).
        operations: the layer namespace (:mod:`textenc.nn.ops`).
    """

    load_config = staticmethod(load_t5_config)

    def __init__(self, config_dict: T5Config | str | dict, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__()
        config = load_t5_config(config_dict)
        self.config = config
        self.num_layers = config.num_layers
        self.dtype = dtype
        self.encoder = T5Stack(config, dtype, device, operations)
        self.shared = operations.Embedding(config.vocab_size, config.d_model, dtype=dtype, device=device)

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, embeddings) -> None:
        self.shared = embeddings

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None, num_tokens: Sequence[int] | None = None,
                intermediate_output: IntermediateSpec = None, final_layer_norm_intermediate: bool = True,
                dtype: torch.dtype = torch.float32, *, return_last_hidden: bool = True,
                attention_backend: str | None = None, row_groups: Sequence[int] | None = None,
                fast_pooled: bool = False) -> T5Output:
        """Encode token ids (B, T) or input embeddings (B, T, D).

        Args:
            attention_mask: (B, T) 1 for tokens to attend, 0 for padding; None attends everything.
            embeds: input embeddings instead of ``input_ids`` (cast to ``dtype``).
            num_tokens, row_groups, fast_pooled: accepted for the CLIP call signature; T5 has no
                pooled token.
            intermediate_output: block index (negative from the end) or ``"all"`` (stacked (B, L, T, D)).
            final_layer_norm_intermediate: apply the final RMS norm to the intermediate output (ComfyUI).
            dtype: compute dtype (fp32 default, as ComfyUI).
            return_last_hidden: False with an integer intermediate stops after that block
                (``last_hidden_state`` is then None; the intermediate is unchanged).
            attention_backend: an attention backend name (see :mod:`textenc.nn.attention`).
        """
        if embeds is not None:
            x = embeds.to(dtype)
        else:
            x = self.shared(input_ids, out_dtype=dtype)
        if self.shared.weight.dtype not in _PLAIN_FLOAT_DTYPES:
            # fp8 embedding tables can hold NaN codes (ComfyUI: "Fix for fp8 T5 base").
            x = torch.nan_to_num(x)
        last, intermediate = self.encoder(x, attention_mask, intermediate_output, final_layer_norm_intermediate,
                                          return_last_hidden=return_last_hidden,
                                          attention_backend=attention_backend)
        return T5Output(last, intermediate)
