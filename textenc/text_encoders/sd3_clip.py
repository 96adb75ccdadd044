"""SD3 / SD3.5's three text encoders: CLIP ViT-L (``"l"``), OpenCLIP ViT-bigG (``"g"``) and
T5-XXL (``"t5xxl"``), as ComfyUI's ``comfy/text_encoders/sd3_clip.py`` combines them.

* L and G at their penultimate layer without the final layer norm, side by side on the
  feature axis (768 + 1280), both cut to the shorter one's length, then zero-padded to
  T5's width (4096);
* T5 (unmasked, at least 77 tokens) after them on the token axis: cond
  ``[1, 77·windows + T, 4096]``;
* pooled: L's unprojected pooled output beside G's projected one, ``[1, 2048]``.

Any subset of the three may be loaded, as in ComfyUI: a missing CLIP part is zeros
(features and pooled), a missing T5 is left out, and with nothing loaded the cond is
zeros ``[1, 77, 4096]``. The width CLIP is padded to is T5's ``d_model`` (4096 in every
released T5-XXL; ComfyUI's constant when no T5 is loaded), so tiny test models combine too.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import CheckpointError, EncodeError, PromptError
from ..prompts.tokenizer import SDTokenizer
from .a1111_families import encode_sd3_a1111, encode_sd3_a1111_schedule, is_sd3_a1111, tokenize_sd3_a1111
from .batch import PromptByPromptMixin
from .registry import Family, Role, register_family
from .sd1_clip import SD1_SPECIAL_TOKENS, SDClipModel, gen_empty_tokens
from .sdxl_clip import SDXLClipG, SDXLClipGTokenizer
from .t5 import T5XXLModel, T5XXLTokenizer

__all__ = ["SD3Tokenizer", "SD3ClipModel", "sd3_clip", "SD3_WIDTH", "empty_clip_window", "empty_t5_tokens"]

#: ComfyUI's cond width for SD3 (T5-XXL's d_model); CLIP features are zero-padded to it.
SD3_WIDTH = 4096
#: ComfyUI's widths of a missing CLIP part: L's pooled/features 768, G's 1280.
_L_WIDTH, _G_WIDTH = 768, 1280
_G_SPECIAL_TOKENS = {"start": 49406, "end": 49407, "pad": 0}


def empty_clip_window(encoder: SDClipModel | None, default: Mapping[str, int]) -> list[list[tuple[int, float]]]:
    """The empty prompt's one CLIP window, ``[start, end, pad...]`` of 77 tokens."""
    special = encoder.special_tokens if encoder is not None else default
    length = encoder.max_length if encoder is not None else 77
    return [[(token, 1.0) for token in gen_empty_tokens(special, length)]]


def empty_t5_tokens(min_length: int) -> list[list[tuple[int, float]]]:
    """The empty prompt of a T5 role: ``[1, 0, ...]`` of ``min_length`` tokens."""
    return [[(token, 1.0) for token in gen_empty_tokens({"end": 1, "pad": 0}, min_length)]]


class SD3Tokenizer:
    """Tokenizes for all three encoders → ``{"g": windows, "l": windows, "t5xxl": [sequence]}``
    (ComfyUI's ``SD3Tokenizer``; T5's minimum length 77).

    ``syntax="a1111"`` reads the whole prompt as AUTOMATIC1111's SD3 does
    (:mod:`textenc.text_encoders.a1111_families`); other syntaxes go to each part's tokenizer."""

    #: syntax → a reading of the whole prompt for all three parts.
    syntax_readings = {"a1111": tokenize_sd3_a1111}

    def __init__(self, embedding_directory=None, tokenizer_data: Mapping | None = None, *,
                 l_kwargs: Mapping[str, Any] | None = None, g_kwargs: Mapping[str, Any] | None = None,
                 t5xxl_kwargs: Mapping[str, Any] | None = None) -> None:
        data = dict(tokenizer_data or {})
        self.clip_l = SDTokenizer(embedding_directory=embedding_directory, tokenizer_data=data, **dict(l_kwargs or {}))
        self.clip_g = SDXLClipGTokenizer(embedding_directory=embedding_directory, tokenizer_data=data,
                                         **dict(g_kwargs or {}))
        self.t5xxl = T5XXLTokenizer(embedding_directory=embedding_directory, tokenizer_data=data,
                                    **{"min_length": 77, **dict(t5xxl_kwargs or {})})

    @classmethod
    def for_roles(cls, arguments: Mapping[str, Mapping[str, Any]], *, embedding_directory=None) -> "SD3Tokenizer":
        """All three tokenizers, from ``{"l": arguments, "g": ..., "t5xxl": ...}`` (missing roles: defaults)."""
        return cls(embedding_directory=embedding_directory, l_kwargs=arguments.get("l"),
                   g_kwargs=arguments.get("g"), t5xxl_kwargs=arguments.get("t5xxl"))

    @property
    def tokenizers(self) -> dict[str, SDTokenizer]:
        """``{"l": clip_l, "g": clip_g, "t5xxl": t5xxl}``."""
        return {"l": self.clip_l, "g": self.clip_g, "t5xxl": self.t5xxl}

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        reading = self.syntax_readings.get(kwargs.get("syntax"))
        if reading is not None:
            return reading(self, text, return_word_ids, **kwargs)
        return {"g": self.clip_g.tokenize_with_weights(text, return_word_ids, **kwargs),
                "l": self.clip_l.tokenize_with_weights(text, return_word_ids, **kwargs),
                "t5xxl": self.t5xxl.tokenize_with_weights(text, return_word_ids, **kwargs)}

    def untokenize(self, token_weight_pair):
        return self.clip_g.untokenize(token_weight_pair)

    def state_dict(self) -> dict:
        return {}


class SD3ClipModel(PromptByPromptMixin, torch.nn.Module):
    """SD3's text encoders; ``encode_token_weights`` → ``(cond [1, T, 4096], pooled [1, 2048], extra)``.

    Args:
        clip_l, clip_g, t5: which encoders exist (ComfyUI's flags); a missing one is None.
        t5_attention_mask: run T5 masked and return ``extra["attention_mask"]``
            (ComfyUI's option; SD3 itself runs unmasked).
        l_config, g_config, t5xxl_config: their text configs (default: the released ones).
        width_without_t5: the cond width when no T5 is loaded: ComfyUI's 4096; a diffusers
            pipeline without ``text_encoder_3`` takes its transformer's ``joint_attention_dim``
            (:func:`textenc.diffusers.load_from_diffusers` passes it).
    """

    t5_min_length = 77

    def __init__(self, clip_l: bool = True, clip_g: bool = True, t5: bool = True, device="cpu", dtype=None,
                 model_options: Mapping | None = None, *, t5_attention_mask: bool = False,
                 l_config=None, g_config=None, t5xxl_config=None, width_without_t5: int = SD3_WIDTH,
                 **kwargs: Any) -> None:
        super().__init__()
        self.width_without_t5 = width_without_t5
        self.clip_l = (SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                   layer_norm_hidden_state=False, return_projected_pooled=False,
                                   textmodel_json_config=l_config, **kwargs) if clip_l else None)
        self.clip_g = SDXLClipG(device=device, dtype=dtype, textmodel_json_config=g_config, **kwargs) if clip_g else None
        self.t5_attention_mask = t5_attention_mask
        self.t5xxl = (T5XXLModel(device=device, dtype=dtype, attention_mask=t5_attention_mask,
                                 textmodel_json_config=t5xxl_config, **kwargs) if t5 else None)
        self.dtypes = {dtype} if dtype is not None else set()

    @classmethod
    def for_roles(cls, configs: Mapping[str, Any], *, device="cpu", dtype=None,
                  width_without_t5: int = SD3_WIDTH) -> "SD3ClipModel":
        """The encoders of the roles in ``configs`` (``{"l": config, "t5xxl": config}``: no G)."""
        return cls(clip_l="l" in configs, clip_g="g" in configs, t5="t5xxl" in configs, device=device,
                   dtype=dtype, l_config=configs.get("l"), g_config=configs.get("g"),
                   t5xxl_config=configs.get("t5xxl"), width_without_t5=width_without_t5)

    @property
    def encoders(self) -> dict[str, SDClipModel]:
        """The loaded encoders by role, in the order ``l``, ``g``, ``t5xxl``."""
        found = {"l": self.clip_l, "g": self.clip_g, "t5xxl": self.t5xxl}
        return {role: encoder for role, encoder in found.items() if encoder is not None}

    def set_clip_options(self, options) -> None:
        for encoder in self.encoders.values():
            encoder.set_clip_options(options)

    def reset_clip_options(self) -> None:
        for encoder in self.encoders.values():
            encoder.reset_clip_options()

    def empty_tokens(self) -> dict[str, list]:
        return {"l": empty_clip_window(self.clip_l, SD1_SPECIAL_TOKENS),
                "g": empty_clip_window(self.clip_g, _G_SPECIAL_TOKENS),
                "t5xxl": empty_t5_tokens(self.t5_min_length)}

    @property
    def width(self) -> int:
        """The cond width: T5's ``d_model``, or ``width_without_t5`` (ComfyUI's 4096) without T5."""
        return self.t5xxl.config.d_model if self.t5xxl is not None else self.width_without_t5

    def _clip_parts(self, tokens: Mapping[str, list], options) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(L ‖ G features padded to the width, or None without CLIP; pooled [1, 2048])``."""
        l_out = g_out = None
        if self.clip_l is not None:
            l_out, l_pooled = self.clip_l.encode_token_weights(tokens["l"], options=options)[:2]
        else:
            l_pooled = torch.zeros((1, _L_WIDTH))
        if self.clip_g is not None:
            g_out, g_pooled = self.clip_g.encode_token_weights(tokens["g"], options=options)[:2]
        else:
            g_pooled = torch.zeros((1, _G_WIDTH))
        if l_out is not None and g_out is not None:
            cut = min(l_out.shape[1], g_out.shape[1])  # ComfyUI cuts, where SDXL pads
            features = torch.cat([l_out[:, :cut], g_out[:, :cut]], dim=-1)
        elif g_out is not None:
            features = torch.nn.functional.pad(g_out, (_L_WIDTH, 0))  # L's 768 zero columns first
        else:
            features = l_out
        pooled = torch.cat([l_pooled, g_pooled], dim=-1)
        if features is None:
            return None, pooled
        if features.shape[-1] > self.width:
            raise EncodeError(f"SD3: CLIP features of width {features.shape[-1]} do not fit T5's width "
                              f"{self.width}; the encoders are not an SD3 set")
        return torch.nn.functional.pad(features, (0, self.width - features.shape[-1])), pooled

    def encode_token_weights(self, token_weight_pairs, *, options=None, need_pooled: bool = True):
        """``(cond, pooled, extra)`` as ComfyUI's ``SD3ClipModel``; ``extra`` holds T5's
        ``attention_mask`` with ``t5_attention_mask``. ``need_pooled`` changes nothing
        (L and G are both part of cond)."""
        missing = {"l", "g", "t5xxl"} - set(token_weight_pairs)
        if missing:
            raise PromptError(f"SD3 needs tokens for encoders 'g', 'l' and 't5xxl'; missing {sorted(missing)} "
                              "(tokenize with the SD3 tokenizer)")
        if is_sd3_a1111(token_weight_pairs):  # syntax="a1111": A1111's SD3 encode
            cond, pooled = encode_sd3_a1111(self, [token_weight_pairs], options)[0]
            return cond, pooled, {}
        out, pooled = None, None
        extra: dict[str, Any] = {}
        if len(token_weight_pairs["g"]) > 0 or len(token_weight_pairs["l"]) > 0:
            out, pooled = self._clip_parts(token_weight_pairs, options)
        if self.t5xxl is not None:
            t5_output = self.t5xxl.encode_token_weights(token_weight_pairs["t5xxl"], options=options)
            if self.t5_attention_mask:
                extra["attention_mask"] = t5_output[2]["attention_mask"]
            out = t5_output[0] if out is None else torch.cat([out, t5_output[0]], dim=-2)
        if out is None:
            out = torch.zeros((1, 77, self.width))
        if pooled is None:
            pooled = torch.zeros((1, _L_WIDTH + _G_WIDTH))
        return out, pooled, extra

    def a1111_schedule(self, tokenize, texts, options) -> list:
        """The texts of one ``syntax="a1111"`` schedule in one batch, as A1111 encodes them."""
        return encode_sd3_a1111_schedule(self, tokenize, texts, options)

    def load_sd(self, sd, *, strict: bool = True, require_finite: bool = True):
        """Load one encoder, told apart by its keys as ComfyUI does (G has a layer 30, L a layer 1)."""
        if "text_model.encoder.layers.30.mlp.fc1.weight" in sd and self.clip_g is not None:
            return self.clip_g.load_sd(sd, strict=strict, require_finite=require_finite)
        if "text_model.encoder.layers.1.mlp.fc1.weight" in sd and self.clip_l is not None:
            return self.clip_l.load_sd(sd, strict=strict, require_finite=require_finite)
        if self.t5xxl is None:
            raise CheckpointError("SD3: these weights are neither CLIP-G nor CLIP-L, and no T5 encoder was built")
        return self.t5xxl.load_sd(sd, strict=strict, require_finite=require_finite)


def sd3_clip(clip_l: bool = True, clip_g: bool = True, t5: bool = True, t5_attention_mask: bool = False,
             **_ignored: Any) -> type:
    """ComfyUI's factory: an ``SD3ClipModel`` subclass with these encoders (``dtype_t5`` and
    ``t5_quantization_metadata`` are accepted and ignored: textenc reads them from the file)."""

    class SD3ClipModel_(SD3ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options: Mapping | None = None) -> None:
            super().__init__(clip_l=clip_l, clip_g=clip_g, t5=t5, t5_attention_mask=t5_attention_mask,
                             device=device, dtype=dtype, model_options=model_options)

    return SD3ClipModel_


#: SD3 / SD3.5: CLIP-L and CLIP-G (penultimate, no final norm) beside each other, then T5-XXL
#: on the token axis; any subset may be loaded. diffusers' StableDiffusion3Pipeline takes
#: pooled_prompt_embeds (L's ‖ G's) and T5 as text_encoder_3.
SD3 = register_family(Family(
    "sd3", "SD3",
    roles=(Role("l", SDClipModel, SDTokenizer),
           Role("g", SDXLClipG, SDXLClipGTokenizer, activation="gelu", pad_token=0,
                diffusers_text_encoder="text_encoder_2", diffusers_tokenizer="tokenizer_2"),
           Role("t5xxl", T5XXLModel, T5XXLTokenizer, encoder="t5", attribute_name="t5xxl", min_length=77,
                diffusers_text_encoder="text_encoder_3", diffusers_tokenizer="tokenizer_3")),
    model_class=SD3ClipModel, tokenizer_class=SD3Tokenizer, comfy_default_layer=-2,
    diffusers_default_layer=-2, pipeline_prefix="StableDiffusion3", diffusers_pooled=True,
    checkpoint_layouts=("sd3",), partial=True, unequal_lengths="refuse"))
