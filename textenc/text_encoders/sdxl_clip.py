"""SDXL's two text encoders: CLIP ViT-L (``"l"``) and OpenCLIP ViT-bigG (``"g"``).

Both use the penultimate layer *without* the final layer norm; their outputs
are concatenated along the width (768 + 1280 = 2048) and the pooled output is
bigG's projected one, as in ComfyUI's ``sdxl_clip``. When the two sides end up
with different numbers of windows (an embedding that only one side has), the
shorter side is padded with whole windows of its empty-prompt encoding rather
than the longer one being cut.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import CheckpointError, PromptError
from .sd1_clip import SDClipModel
from .batch import FamilyEncodeMixin
from .encode import empty_encoding
from .registry import Family, Role, register_family
from .sd2_clip import SD2_SPECIAL_TOKENS
from ..prompts.tokenizer import SDTokenizer

__all__ = ["SDXLClipG", "SDXLClipGTokenizer", "SDXLTokenizer", "SDXLClipModel"]


class SDXLClipG(SDClipModel):
    """OpenCLIP ViT-bigG/14 text encoder (penultimate, no final layer norm, projected pooled)."""

    def __init__(self, device="cpu", max_length: int = 77, freeze: bool = True,
                 layer: str = "penultimate", layer_idx: int | None = None, dtype=None,
                 textmodel_json_config=None, model_options: Mapping | None = None, **kwargs) -> None:
        if layer == "penultimate":
            layer, layer_idx = "hidden", -2
        kwargs.setdefault("special_tokens", SD2_SPECIAL_TOKENS)
        kwargs.setdefault("layer_norm_hidden_state", False)
        kwargs.setdefault("return_projected_pooled", True)
        super().__init__(device=device, max_length=max_length, freeze=freeze, layer=layer,
                         layer_idx=layer_idx, textmodel_json_config=textmodel_json_config or "clip_g",
                         dtype=dtype, **kwargs)


class SDXLClipGTokenizer(SDTokenizer):
    def __init__(self, tokenizer_path=None, embedding_directory=None, tokenizer_data=None, **kwargs) -> None:
        kwargs.setdefault("embedding_size", 1280)
        kwargs.setdefault("embedding_key", "clip_g")
        super().__init__(tokenizer_path, pad_with_end=False, embedding_directory=embedding_directory,
                         tokenizer_data=tokenizer_data, **kwargs)


class SDXLTokenizer:
    """Tokenizes for both encoders → ``{"g": windows, "l": windows}``."""

    def __init__(self, embedding_directory=None, tokenizer_data=None, *,
                 l_kwargs: Mapping[str, Any] | None = None, g_kwargs: Mapping[str, Any] | None = None) -> None:
        self.clip_l = SDTokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                                  **dict(l_kwargs or {}))
        self.clip_g = SDXLClipGTokenizer(embedding_directory=embedding_directory,
                                         tokenizer_data=tokenizer_data, **dict(g_kwargs or {}))

    @classmethod
    def for_roles(cls, arguments: Mapping[str, Mapping[str, Any]], *, embedding_directory=None) -> "SDXLTokenizer":
        """Both tokenizers, from ``{"l": arguments, "g": arguments}``."""
        return cls(embedding_directory=embedding_directory, l_kwargs=arguments["l"], g_kwargs=arguments["g"])

    @property
    def tokenizers(self) -> dict[str, SDTokenizer]:
        """``{"l": clip_l, "g": clip_g}``."""
        return {"l": self.clip_l, "g": self.clip_g}

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        return {"g": self.clip_g.tokenize_with_weights(text, return_word_ids, **kwargs),
                "l": self.clip_l.tokenize_with_weights(text, return_word_ids, **kwargs)}

    def untokenize(self, token_weight_pair):
        return self.clip_g.untokenize(token_weight_pair)

    def state_dict(self) -> dict:
        return {}


def _pad_windows(model: SDClipModel, cond: torch.Tensor, windows: int, options) -> torch.Tensor:
    """Append empty-prompt windows to ``cond`` [1, T·w, D] until it has ``windows`` windows."""
    length = model.max_length
    have = cond.shape[1] // length
    if have >= windows:
        return cond
    z_empty = empty_encoding(model, length, model.resolve_options(options))[0]
    return torch.cat([cond] + [z_empty.unsqueeze(0)] * (windows - have), dim=1)


class SDXLClipModel(FamilyEncodeMixin, torch.nn.Module):
    """Both SDXL text encoders; ``encode_token_weights`` → ``(cond [1, T, 2048], pooled [1, 1280])``."""

    pooled_role = "g"

    def __init__(self, device="cpu", dtype=None, model_options: Mapping | None = None, *,
                 l_config=None, g_config=None, **kwargs) -> None:
        super().__init__()
        self.clip_l = SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                  layer_norm_hidden_state=False, textmodel_json_config=l_config, **kwargs)
        self.clip_g = SDXLClipG(device=device, dtype=dtype, textmodel_json_config=g_config, **kwargs)
        self.dtypes = {dtype} if dtype is not None else set()

    @classmethod
    def for_roles(cls, configs: Mapping[str, Any], *, device="cpu", dtype=None) -> "SDXLClipModel":
        """Both encoders, from ``{"l": text config, "g": text config}``."""
        return cls(device=device, dtype=dtype, l_config=configs["l"], g_config=configs["g"])

    @property
    def encoders(self) -> dict[str, SDClipModel]:
        """``{"l": clip_l, "g": clip_g}``, in the order their conds are concatenated."""
        return {"l": self.clip_l, "g": self.clip_g}

    def set_clip_options(self, options) -> None:
        self.clip_l.set_clip_options(options)
        self.clip_g.set_clip_options(options)

    def reset_clip_options(self) -> None:
        self.clip_g.reset_clip_options()
        self.clip_l.reset_clip_options()

    def encode_token_weights(self, token_weight_pairs, *, options=None, need_pooled: bool = True):
        """``(cond [1, T, 2048], pooled [1, 1280])``: L's and G's cond side by side and G's
        pooled (None with ``need_pooled=False``). L is called with ``need_pooled=False``:
        SDXL never uses its pooled output, so it skips compel's raw-text window."""
        missing = {"g", "l"} - set(token_weight_pairs)
        if missing:
            raise PromptError(f"SDXL needs tokens for encoders 'g' and 'l'; missing {sorted(missing)}")
        g_out, g_pooled = self.clip_g.encode_token_weights(token_weight_pairs["g"], options=options,
                                                           need_pooled=need_pooled)[:2]
        # SDXL's pooled output is G's alone, so L skips what only its pooled would need.
        l_out = self.clip_l.encode_token_weights(token_weight_pairs["l"], options=options, need_pooled=False)[0]
        length = self.clip_g.max_length
        windows = max(g_out.shape[1], l_out.shape[1]) // length
        g_out = _pad_windows(self.clip_g, g_out, windows, options)
        l_out = _pad_windows(self.clip_l, l_out, windows, options)
        return torch.cat([l_out, g_out], dim=-1), g_pooled

    def load_sd(self, sd, *, strict: bool = True, require_finite: bool = True):
        """Load one encoder: the one whose width matches (``text_model`` 768 → l, else g)."""
        key = "text_model.embeddings.token_embedding.weight"
        if key not in sd:
            raise CheckpointError(f"not an HF-layout text encoder state dict: {key!r} is missing")
        width = sd[key].shape[1]
        target = self.clip_l if width == self.clip_l.config.hidden_size else self.clip_g
        return target.load_sd(sd, strict=strict, require_finite=require_finite)


#: SDXL: CLIP ViT-L and OpenCLIP ViT-bigG side by side, both at their penultimate layer
#: without the final norm; the pipeline takes bigG's pooled output too.
SDXL = register_family(Family(
    "sdxl", "SDXL",
    roles=(Role("l", SDClipModel, SDTokenizer),
           Role("g", SDXLClipG, SDXLClipGTokenizer, activation="gelu", pad_token=0,
                diffusers_text_encoder="text_encoder_2", diffusers_tokenizer="tokenizer_2")),
    model_class=SDXLClipModel, tokenizer_class=SDXLTokenizer, comfy_default_layer=-2,
    diffusers_default_layer=-2, pipeline_prefix="StableDiffusionXL", diffusers_pooled=True,
    checkpoint_layouts=("sdxl",)))
