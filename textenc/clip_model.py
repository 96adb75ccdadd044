"""CLIP text and vision transformers as pure ``nn.Module``s.

Parameter names are Hugging Face transformers' (``text_model.encoder.layers.N.
self_attn.q_proj.weight``, ``vision_model.pre_layrnorm.weight`` — HF's
misspelling kept on purpose so HF state dicts load as they are). Every module
takes ``dtype``, ``device`` and an ``operations`` namespace (see
:mod:`textenc.ops`) and holds no global state; the attention backend is chosen
per call by :func:`textenc.attention.optimized_attention_for_device`.

Shapes in comments: B batch, T tokens, D width, H heads.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

import torch
import torch.nn.functional as F

from . import ops
from .attention import optimized_attention_for_device
from .config import CLIPTextConfig, CLIPVisionConfig, load_text_config, load_vision_config
from .errors import ConfigError

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "CLIPAttention", "CLIPMLP", "CLIPLayer", "CLIPEncoder", "CLIPEmbeddings",
    "CLIPTextModel_", "CLIPTextModel", "CLIPTextOutput",
    "CLIPVisionEmbeddings", "CLIPVision", "CLIPVisionModelProjection", "CLIPVisionOutput",
]

IntermediateSpec = Union[int, str, None]


def _autograd(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU (constant 1.702 from the CLIP repo).
    return x * torch.sigmoid(1.702 * x)


#: Elements per chunk of the in-place quick_gelu on CPU: 256 KiB of fp32, so the
#: sigmoid temporary stays in L2 cache instead of streaming (B, T, 4D) through
#: memory three times.
QUICK_GELU_CHUNK = 1 << 16


def _quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    # Bit-identical to _quick_gelu (silu(1.702x)/1.702 would need no temporary but
    # differs by an ulp, which breaks 1e-5 parity at |x| ~ 50).
    if x.device.type != "cpu" or not x.is_contiguous() or x.numel() <= QUICK_GELU_CHUNK:
        return (x * 1.702).sigmoid_().mul_(x)
    flat = x.view(-1, x.shape[-1])
    rows = max(1, QUICK_GELU_CHUNK // x.shape[-1])
    scratch = torch.empty((rows, x.shape[-1]), dtype=x.dtype)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows]
        sigmoid = scratch[: chunk.shape[0]]
        torch.mul(chunk, 1.702, out=sigmoid).sigmoid_()
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
        if scratch is None or _autograd(x) or not getattr(self.fc1, "supports_out", False) \
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
                attention_backend: str | None = None,
                causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(last, intermediate)``.

        ``intermediate`` is the output of layer ``intermediate_output`` (0-based;
        negative from the end), all layers stacked as (B, layers, T, D) for
        ``"all"``, or None. With ``tail_rows`` (B,), the last layer computes only
        those rows and ``last`` is (B, 1, D) (this needs causal attention:
        ``causal=True`` or a causal ``mask``). ``causal`` blocks keys after each
        query on top of ``mask``.
        """
        attention = optimized_attention_for_device(
            x.device, mask=mask is not None, small_input=True, backend=attention_backend)
        index = resolve_layer_index(intermediate_output, len(self.layers))
        collected: list[torch.Tensor] = []
        intermediate = None
        last = len(self.layers) - 1
        # Only without autograd: out= ops do not record gradients.
        scratch = _Scratch() if x.device.type == "cpu" and not torch.is_grad_enabled() else None
        for i, layer in enumerate(self.layers):
            rows = tail_rows if i == last and index != last else None
            x = layer(x, mask, attention, rows=rows, causal=causal, scratch=scratch)
            if index == "all":
                collected.append(x)
            elif i == index:
                intermediate = x
        if index == "all":
            intermediate = torch.stack(collected, dim=1)
        return x, intermediate


class CLIPEmbeddings(torch.nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, embed_dim: int, vocab_size: int = 49408, num_positions: int = 77,
                 dtype=None, device=None, operations=ops.disable_weight_init) -> None:
        super().__init__()
        self.token_embedding = operations.Embedding(vocab_size, embed_dim, dtype=dtype, device=device)
        self.position_embedding = operations.Embedding(num_positions, embed_dim, dtype=dtype, device=device)

    def forward(self, input_tokens: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        # input_tokens: (B, T) int -> (B, T, D)
        x = self.token_embedding(input_tokens, out_dtype=dtype)
        positions = self.position_embedding.weight[: input_tokens.shape[1]]
        return x + ops.cast_to(positions, dtype=x.dtype, device=x.device)


class CLIPTextOutput(NamedTuple):
    """Outputs of :class:`CLIPTextModel`; also indexable like ComfyUI's 4-tuple."""

    last_hidden_state: torch.Tensor | None
    intermediate: torch.Tensor | None
    projected_pooled: torch.Tensor
    pooled_output: torch.Tensor


def _additive_mask(attention_mask: torch.Tensor | None, tokens: int,
                   dtype: torch.dtype, device) -> torch.Tensor:
    """Causal mask, combined with a (B, T) 1/0 padding mask when given -> (B|1, 1, T, T)."""
    blocked = torch.finfo(dtype).min
    causal = torch.full((tokens, tokens), blocked, dtype=dtype, device=device).triu_(1)
    if attention_mask is None:
        return causal.view(1, 1, tokens, tokens)
    keys_blocked = (attention_mask.to(device) == 0).view(attention_mask.shape[0], 1, 1, tokens)
    # masked_fill, not a sum: two blocked entries added would overflow to -inf.
    return causal.view(1, 1, tokens, tokens).masked_fill(keys_blocked, blocked)


#: CLIP's end-of-text token id in the BPE vocabulary.
END_OF_TEXT_TOKEN_ID = 49407
#: eos_token_id written by transformers before PR #24773
#: (https://github.com/huggingface/transformers/pull/24773), still found in
#: diffusers' SD1.x and SDXL ``text_encoder/config.json``.
LEGACY_EOS_TOKEN_ID = 2


def _pooling_eos_token_id(eos_token_id: int) -> int:
    # With the legacy id, transformers pools at the argmax token id, which for
    # tokenizer output is the first end-of-text token; pooling at the first
    # 49407 gives the same row and still ignores textual-inversion ids above
    # the vocabulary. Pooling at a literal 2 would miss the EOS entirely.
    return END_OF_TEXT_TOKEN_ID if eos_token_id == LEGACY_EOS_TOKEN_ID else eos_token_id


class CLIPTextModel_(torch.nn.Module):
    """CLIP text transformer: embeddings → encoder → final layer norm → pooled token."""

    def __init__(self, config_dict: CLIPTextConfig | dict, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__()
        config = load_text_config(config_dict)
        self.config = config
        self.eos_token_id = _pooling_eos_token_id(config.eos_token_id)
        self.embeddings = CLIPEmbeddings(config.hidden_size, config.vocab_size,
                                         config.max_position_embeddings, dtype, device, operations)
        self.encoder = CLIPEncoder(config.num_hidden_layers, config.hidden_size,
                                   config.num_attention_heads, config.intermediate_size,
                                   config.hidden_act, config.layer_norm_eps, dtype, device, operations)
        self.final_layer_norm = operations.LayerNorm(config.hidden_size, eps=config.layer_norm_eps,
                                                     dtype=dtype, device=device)

    def _pool_positions(self, input_tokens, num_tokens, batch: int, tokens: int, device) -> torch.Tensor:
        if num_tokens is not None:
            return torch.as_tensor(num_tokens, device=device).long().sub(1).clamp(0, tokens - 1)
        if input_tokens is None:
            raise ValueError("pass num_tokens when encoding from embeds without input_tokens")
        # First end-of-text token, not argmax over ids: appended textual-inversion
        # rows get ids above the vocabulary and would win an argmax.
        is_eos = input_tokens.to(device) == self.eos_token_id
        first = is_eos.int().argmax(dim=-1)
        return torch.where(is_eos.any(dim=-1), first, torch.full_like(first, tokens - 1))

    def forward(self, input_tokens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None, num_tokens=None,
                intermediate_output: IntermediateSpec = None,
                final_layer_norm_intermediate: bool = True,
                dtype: torch.dtype = torch.float32, *,
                return_last_hidden: bool = True,
                attention_backend: str | None = None) -> tuple:
        """Encode tokens (B, T) or input embeddings (B, T, D).

        Returns ``(last_hidden_state, intermediate, pooled_output)``. With
        ``return_last_hidden=False`` (and an intermediate layer requested) the
        layers after the intermediate one run only as far as the pooled token
        needs, and ``last_hidden_state`` is None.
        """
        if embeds is not None:
            position = self.embeddings.position_embedding.weight[: embeds.shape[1]]
            x = embeds.to(dtype) + ops.cast_to(position, dtype=dtype, device=embeds.device)
        else:
            x = self.embeddings(input_tokens, dtype=dtype)
        batch, tokens = x.shape[:2]
        # Without padding the mask is purely causal: let the attention kernel
        # apply it (SDPA's is_causal skips the blocked half instead of reading
        # a (T, T) mask).
        causal = attention_mask is None
        mask = None if causal else _additive_mask(attention_mask, tokens, x.dtype, x.device)
        pool_at = self._pool_positions(input_tokens, num_tokens, batch, tokens, x.device)
        partial = not return_last_hidden and intermediate_output not in (None, "all")
        x, intermediate = self.encoder(x, mask=mask, intermediate_output=intermediate_output,
                                       tail_rows=pool_at if partial else None,
                                       attention_backend=attention_backend, causal=causal)
        x = self.final_layer_norm(x)
        if intermediate is not None and final_layer_norm_intermediate:
            intermediate = self.final_layer_norm(intermediate)
        if partial and x.shape[1] == 1:
            return None, intermediate, x[:, 0]
        pooled = x[torch.arange(batch, device=x.device), pool_at]
        return (x if return_last_hidden else None), intermediate, pooled


class CLIPTextModel(torch.nn.Module):
    """:class:`CLIPTextModel_` plus the text projection (HF ``CLIPTextModelWithProjection``)."""

    def __init__(self, config_dict: CLIPTextConfig | dict, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__()
        config = load_text_config(config_dict)
        self.num_layers = config.num_hidden_layers
        self.text_model = CLIPTextModel_(config, dtype, device, operations)
        self.text_projection = operations.Linear(config.hidden_size, config.projection_dim,
                                                 bias=False, dtype=dtype, device=device)
        self.dtype = dtype

    def get_input_embeddings(self):
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, embeddings) -> None:
        self.text_model.embeddings.token_embedding = embeddings

    def forward(self, *args, **kwargs) -> CLIPTextOutput:
        last, intermediate, pooled = self.text_model(*args, **kwargs)
        return CLIPTextOutput(last, intermediate, self.text_projection(pooled), pooled)


class CLIPVisionEmbeddings(torch.nn.Module):
    """Patch embedding (conv, no bias), class token and position embedding."""

    def __init__(self, embed_dim: int, num_channels: int = 3, patch_size: int = 14,
                 image_size: int = 224, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__()
        self.class_embedding = torch.nn.Parameter(torch.empty(embed_dim, dtype=dtype, device=device))
        self.patch_embedding = operations.Conv2d(num_channels, embed_dim, kernel_size=patch_size,
                                                 stride=patch_size, bias=False, dtype=dtype, device=device)
        num_positions = (image_size // patch_size) ** 2 + 1
        self.position_embedding = operations.Embedding(num_positions, embed_dim, dtype=dtype, device=device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: (B, C, S, S) -> (B, 1 + patches, D)
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = ops.cast_to(self.class_embedding, dtype=patches.dtype, device=patches.device)
        x = torch.cat([cls.expand(patches.shape[0], 1, -1), patches], dim=1)
        return x + ops.cast_to(self.position_embedding.weight, dtype=x.dtype, device=x.device)


class CLIPVision(torch.nn.Module):
    """CLIP vision transformer (HF ``CLIPVisionTransformer``)."""

    def __init__(self, config_dict: CLIPVisionConfig | dict, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__()
        config = load_vision_config(config_dict)
        width = config.hidden_size
        self.embeddings = CLIPVisionEmbeddings(width, config.num_channels, config.patch_size,
                                               config.image_size, dtype, device, operations)
        # "pre_layrnorm" is Hugging Face's spelling; kept so HF state dicts load unchanged.
        self.pre_layrnorm = operations.LayerNorm(width, eps=config.layer_norm_eps, dtype=dtype, device=device)
        self.encoder = CLIPEncoder(config.num_hidden_layers, width, config.num_attention_heads,
                                   config.intermediate_size, config.hidden_act,
                                   config.layer_norm_eps, dtype, device, operations)
        self.post_layernorm = operations.LayerNorm(width, eps=config.layer_norm_eps, dtype=dtype, device=device)

    def forward(self, pixel_values: torch.Tensor, attention_mask=None,
                intermediate_output: IntermediateSpec = None, *,
                attention_backend: str | None = None) -> tuple:
        """Return ``(last_hidden_state, intermediate, pooled_output)``; pooled is the
        post-layer-normed class token."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x, intermediate = self.encoder(x, mask=None, intermediate_output=intermediate_output,
                                       attention_backend=attention_backend)
        return x, intermediate, self.post_layernorm(x[:, 0, :])


class CLIPVisionOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    intermediate: torch.Tensor | None
    image_embeds: torch.Tensor


class CLIPVisionModelProjection(torch.nn.Module):
    """:class:`CLIPVision` plus ``visual_projection`` (HF ``CLIPVisionModelWithProjection``)."""

    def __init__(self, config_dict: CLIPVisionConfig | dict, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__()
        config = load_vision_config(config_dict)
        self.config = config
        self.vision_model = CLIPVision(config, dtype, device, operations)
        self.visual_projection = operations.Linear(config.hidden_size, config.projection_dim,
                                                   bias=False, dtype=dtype, device=device)

    def forward(self, *args, **kwargs) -> CLIPVisionOutput:
        last, intermediate, pooled = self.vision_model(*args, **kwargs)
        return CLIPVisionOutput(last, intermediate, self.visual_projection(pooled))
