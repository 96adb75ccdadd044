"""Flux's two text encoders: CLIP ViT-L (``"l"``) and T5-XXL (``"t5xxl"``), as ComfyUI's
``comfy/text_encoders/flux.py`` uses them.

* cond is T5's output alone (unmasked), at least 256 tokens: ``[1, max(256, T), 4096]``;
* pooled is CLIP-L's unprojected pooled output of its first window, ``[1, 768]``
  (L at its last layer, with the final layer norm, as ComfyUI's default ``SDClipModel``).

Flux's guidance is not part of the text encoding: ComfyUI's ``CLIPTextEncodeFlux`` /
``FluxGuidance`` nodes add it to the conditioning.

``syntax="compel"`` reads a prompt as compel's ``CompelForFlux`` (compel 2.5.1) does, not
ComfyUI's way: T5 in one chunk of compel's length (:data:`FLUX_COMPEL_T5_LENGTH`, 512, not
ComfyUI's 256 minimum) with compel's weighting, and the pooled output from CLIP-L of the
fragments' texts, unweighted (:mod:`textenc.prompts.dialects.compel.pooled`); see
``docs/syntax.md``. ``syntax="comfy"`` (the default) stays ComfyUI's.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import ConfigError, PromptError
from ..prompts.tokenizer import SDTokenizer
from .a1111_families import encode_each_schedule_text, tokenize_flux_a1111
from .batch import PromptByPromptMixin
from .registry import Family, Role, register_family
from .sd1_clip import SD1_SPECIAL_TOKENS, SDClipModel
from .sd3_clip import empty_clip_window, empty_t5_tokens
from .t5 import T5XXLModel
from .t5 import T5XXLTokenizer as _T5Tokenizer

__all__ = ["FluxTokenizer", "FluxClipModel", "T5XXLTokenizer", "FluxClipLTokenizer", "flux_clip",
           "FLUX_T5_MIN_LENGTH", "FLUX_COMPEL_T5_LENGTH"]

#: ComfyUI pads Flux's T5 prompt to at least 256 tokens.
FLUX_T5_MIN_LENGTH = 256
#: compel's T5 chunk for Flux: ``tokenizer_2.model_max_length`` of FLUX.1's diffusers folder,
#: which ``CompelForFlux`` encodes ``truncate_long_prompts=True``: 511 ids, ``</s>``, padding.
FLUX_COMPEL_T5_LENGTH = 512
_COMPEL_TRUNCATES = ("compel's CompelForFlux encodes Flux with truncate_long_prompts=True "
                     f"(one T5 chunk of {FLUX_COMPEL_T5_LENGTH} tokens)")


class T5XXLTokenizer(_T5Tokenizer):
    """Flux's T5 tokenizer (ComfyUI's ``flux.T5XXLTokenizer``): minimum length 256.

    Reads ``syntax="compel"`` too, as compel's ``CompelForFlux`` reads T5: chunks of
    ``compel_max_length`` tokens (default 512, compel's ``model_max_length``), truncated.
    """

    syntaxes = ("comfy", "compel")
    syntax_scope = "Flux's T5 on its own (Forge's A1111 reading of Flux goes through FluxTokenizer)"
    compel_truncates = _COMPEL_TRUNCATES
    compel_max_length: int = FLUX_COMPEL_T5_LENGTH  # load_from_diffusers passes the folder's model_max_length

    def __init__(self, embedding_directory=None, tokenizer_data: Mapping | None = None, *,
                 compel_max_length: int = FLUX_COMPEL_T5_LENGTH, **kwargs: Any) -> None:
        kwargs.setdefault("min_length", FLUX_T5_MIN_LENGTH)
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, **kwargs)
        if not isinstance(compel_max_length, int) or isinstance(compel_max_length, bool) or compel_max_length < 2:
            raise ConfigError(f"compel_max_length must be an int of at least 2, got {compel_max_length!r}")
        self.compel_max_length = compel_max_length


class FluxClipLTokenizer(SDTokenizer):
    """Flux's CLIP-L tokenizer: ComfyUI's ``SDTokenizer``; with ``syntax="compel"`` it reads the
    prompt as compel's ``ReturnedEmbeddingsType.POOLED`` (CompelForFlux's CLIP-L gives the pooled
    output only): one unweighted window of the fragments' texts."""

    compel_pooled_only = True


class FluxTokenizer:
    """Tokenizes for both encoders → ``{"l": windows, "t5xxl": [sequence]}`` (ComfyUI's ``FluxTokenizer``).

    ``syntax="a1111"`` reads the whole prompt as Forge's Flux does
    (:mod:`textenc.text_encoders.a1111_families`); other syntaxes go to each part's tokenizer."""

    #: syntax → a reading of the whole prompt for both parts.
    syntax_readings = {"a1111": tokenize_flux_a1111}

    def __init__(self, embedding_directory=None, tokenizer_data: Mapping | None = None, *,
                 l_kwargs: Mapping[str, Any] | None = None, t5xxl_kwargs: Mapping[str, Any] | None = None) -> None:
        data = dict(tokenizer_data or {})
        self.clip_l = FluxClipLTokenizer(embedding_directory=embedding_directory, tokenizer_data=data,
                                         **dict(l_kwargs or {}))
        self.t5xxl = T5XXLTokenizer(embedding_directory=embedding_directory, tokenizer_data=data,
                                    **dict(t5xxl_kwargs or {}))

    @classmethod
    def for_roles(cls, arguments: Mapping[str, Mapping[str, Any]], *, embedding_directory=None) -> "FluxTokenizer":
        """Both tokenizers, from ``{"l": arguments, "t5xxl": arguments}``."""
        return cls(embedding_directory=embedding_directory, l_kwargs=arguments.get("l"),
                   t5xxl_kwargs=arguments.get("t5xxl"))

    @property
    def tokenizers(self) -> dict[str, SDTokenizer]:
        """``{"l": clip_l, "t5xxl": t5xxl}``."""
        return {"l": self.clip_l, "t5xxl": self.t5xxl}

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        reading = self.syntax_readings.get(kwargs.get("syntax"))
        if reading is not None:
            return reading(self, text, return_word_ids, **kwargs)
        return {"l": self.clip_l.tokenize_with_weights(text, return_word_ids, **kwargs),
                "t5xxl": self.t5xxl.tokenize_with_weights(text, return_word_ids, **kwargs)}

    def untokenize(self, token_weight_pair):
        return self.clip_l.untokenize(token_weight_pair)

    def state_dict(self) -> dict:
        return {}


class FluxClipModel(PromptByPromptMixin, torch.nn.Module):
    """Flux's text encoders; ``encode_token_weights`` → ``(T5 cond [1, T, 4096], L pooled [1, 768])``.

    Args:
        l_config, t5xxl_config: their text configs (default: the released ones).
    """

    t5_min_length = FLUX_T5_MIN_LENGTH

    def __init__(self, device="cpu", dtype=None, model_options: Mapping | None = None, *,
                 l_config=None, t5xxl_config=None, **kwargs: Any) -> None:
        super().__init__()
        self.clip_l = SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                  textmodel_json_config=l_config, **kwargs)
        self.t5xxl = T5XXLModel(device=device, dtype=dtype, textmodel_json_config=t5xxl_config, **kwargs)
        self.dtypes = {dtype} if dtype is not None else set()

    @classmethod
    def for_roles(cls, configs: Mapping[str, Any], *, device="cpu", dtype=None) -> "FluxClipModel":
        """Both encoders, from ``{"l": text config, "t5xxl": T5 config}``."""
        return cls(device=device, dtype=dtype, l_config=configs["l"], t5xxl_config=configs["t5xxl"])

    @property
    def encoders(self) -> dict[str, SDClipModel]:
        """``{"l": clip_l, "t5xxl": t5xxl}``."""
        return {"l": self.clip_l, "t5xxl": self.t5xxl}

    def set_clip_options(self, options) -> None:
        self.clip_l.set_clip_options(options)
        self.t5xxl.set_clip_options(options)

    def reset_clip_options(self) -> None:
        self.clip_l.reset_clip_options()
        self.t5xxl.reset_clip_options()

    def empty_tokens(self) -> dict[str, list]:
        return {"l": empty_clip_window(self.clip_l, SD1_SPECIAL_TOKENS), "t5xxl": empty_t5_tokens(self.t5_min_length)}

    def encode_token_weights(self, token_weight_pairs, *, options=None, need_pooled: bool = True):
        """``(cond, pooled)`` as ComfyUI's ``FluxClipModel``. With ``need_pooled=False`` CLIP-L,
        which only gives pooled, is not run (pooled is None; cond is unchanged)."""
        missing = {"l", "t5xxl"} - set(token_weight_pairs)
        if missing:
            raise PromptError(f"Flux needs tokens for encoders 'l' and 't5xxl'; missing {sorted(missing)} "
                              "(tokenize with the Flux tokenizer)")
        cond = self.t5xxl.encode_token_weights(token_weight_pairs["t5xxl"], options=options)[0]
        pooled = None
        if need_pooled:
            pooled = self.clip_l.encode_token_weights(token_weight_pairs["l"], options=options)[1]
        return cond, pooled

    def a1111_schedule(self, tokenize, texts, options) -> list:
        """The texts of one ``syntax="a1111"`` schedule: each on its own, as Forge encodes Flux."""
        return encode_each_schedule_text(self, tokenize, texts, options)

    def load_sd(self, sd, *, strict: bool = True, require_finite: bool = True):
        """Load CLIP-L (keys ``text_model.*``) or T5, as ComfyUI tells them apart."""
        target = self.clip_l if "text_model.encoder.layers.1.mlp.fc1.weight" in sd else self.t5xxl
        return target.load_sd(sd, strict=strict, require_finite=require_finite)


def flux_clip(**_ignored: Any) -> type:
    """ComfyUI's factory (``dtype_t5``, ``t5_quantization_metadata`` are read from the file here)."""
    return FluxClipModel


#: Flux: T5-XXL's output is the cond, CLIP-L's pooled output the pooled; both are needed.
#: diffusers' FluxPipeline: CLIP-L as text_encoder (pooled_prompt_embeds), T5 as text_encoder_2.
FLUX = register_family(Family(
    "flux", "Flux",
    roles=(Role("l", SDClipModel, FluxClipLTokenizer),
           Role("t5xxl", T5XXLModel, T5XXLTokenizer, encoder="t5", attribute_name="t5xxl",
                min_length=FLUX_T5_MIN_LENGTH, diffusers_text_encoder="text_encoder_2",
                diffusers_tokenizer="tokenizer_2")),
    model_class=FluxClipModel, tokenizer_class=FluxTokenizer, comfy_default_layer=-1,
    diffusers_default_layer=-1, pipeline_prefix="Flux", diffusers_pooled=True, checkpoint_layouts=("sd3",),
    unequal_lengths="keep"))
