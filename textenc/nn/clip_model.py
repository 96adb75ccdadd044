"""CLIP text and vision transformers as pure ``nn.Module``s.

Parameter names are Hugging Face transformers' (``text_model.encoder.layers.N.
self_attn.q_proj.weight``, ``vision_model.pre_layrnorm.weight`` — HF's
misspelling kept on purpose so HF state dicts load as they are). Every module
takes ``dtype``, ``device`` and an ``operations`` namespace (see
:mod:`textenc.nn.ops`) and holds no global state. The shared blocks (attention,
MLP, layer, encoder) live in :mod:`textenc.nn.clip_layers` and are importable
from here too, as in ComfyUI's ``comfy.clip_model``.

Shapes in comments: B batch, T tokens, D width, H heads.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from . import ops
from .clip_layers import (ACTIVATION_FUNCTIONS, CLIPMLP, CLIPAttention, CLIPEncoder, CLIPLayer, IntermediateSpec,
                          group_spans)
from .config import CLIPTextConfig, CLIPVisionConfig, load_text_config, load_vision_config

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "CLIPAttention", "CLIPMLP", "CLIPLayer", "CLIPEncoder", "CLIPEmbeddings",
    "CLIPTextModel_", "CLIPTextModel", "CLIPTextOutput",
    "CLIPVisionEmbeddings", "CLIPVision", "CLIPVisionModelProjection", "CLIPVisionOutput",
]


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
                attention_backend: str | None = None,
                row_groups: Sequence[int] | None = None,
                fast_pooled: bool = False) -> tuple:
        """Encode tokens (B, T) or input embeddings (B, T, D).

        Returns ``(last_hidden_state, intermediate, pooled_output)``;
        ``last_hidden_state`` is None with ``return_last_hidden=False``.

        The pooled output is always the last layer's. By default every layer
        runs on every row, as ComfyUI and transformers run them, so pooled is
        theirs bit for bit on CPU (a matmul rounds a row differently when it
        multiplies fewer rows). ``fast_pooled=True`` (with an intermediate
        layer and ``return_last_hidden=False``) runs the layers after the
        intermediate one for the pooled row only: one layer of CLIP-L at clip
        skip 2 costs about a quarter, and pooled differs by fp32 rounding
        (≤ 2.5e-6). ``row_groups`` (sizes summing to B, e.g. the windows of
        each caption in a batch) then runs that one-row tail group by group, so
        each group's pooled output has the bits it has when the group is
        encoded alone (see :class:`CLIPEncoder`).
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
        partial = fast_pooled and not return_last_hidden and intermediate_output not in (None, "all")
        x, intermediate = self.encoder(x, mask=mask, intermediate_output=intermediate_output,
                                       tail_rows=pool_at if partial else None,
                                       row_groups=row_groups if partial else None,
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

    def forward(self, *args, row_groups: Sequence[int] | None = None, **kwargs) -> CLIPTextOutput:
        """Encode (see :meth:`CLIPTextModel_.forward`); with ``row_groups`` the
        pooled rows are also projected group by group, with each group's shapes."""
        last, intermediate, pooled = self.text_model(*args, row_groups=row_groups, **kwargs)
        if row_groups is None:
            return CLIPTextOutput(last, intermediate, self.text_projection(pooled), pooled)
        projected = self.project_pooled(pooled, row_groups, [False] * len(row_groups))
        return CLIPTextOutput(last, intermediate, projected, pooled)


    def project_pooled(self, pooled: torch.Tensor, row_groups: Sequence[int],
                       empty_alongside: Sequence[bool]) -> torch.Tensor:
        """``pooled`` (W, D) projected group by group, each in a batch of the rows ComfyUI projects.

        ComfyUI projects the pooled rows of its whole forward batch at once
        (``CLIPTextModel.forward`` in ``comfy/clip_model.py``): a prompt's windows, plus
        the empty prompt's window that ``encode_token_weights`` encodes alongside
        weighted windows. CPU matmul kernels round a row by how many rows they
        multiply, so each group (``row_groups``: window counts) is projected with a
        zero row appended where ``empty_alongside`` says ComfyUI had the empty window;
        the extra row's values do not change the others', only the kernel's shape.
        """
        out = []
        for (start, stop), extra in zip(group_spans(row_groups, pooled.shape[0]), empty_alongside):
            rows = pooled[start:stop]
            if extra:
                rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
            out.append(self.text_projection(rows)[: stop - start])
        return torch.cat(out)


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
