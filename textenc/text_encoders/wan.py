"""Wan's text encoder: UMT5-XXL (``"umt5xxl"``), as ComfyUI's ``comfy/text_encoders/wan.py``.

One encoder, keyed ``"umt5xxl"`` (ComfyUI's ``WanT5Tokenizer`` / ``WanT5Model``): at least
512 tokens, run with the attention mask (1 up to and including the first ``</s>``) and
the rows after ``</s>`` zeroed; no pooled output (None). The SentencePiece tokenizer
comes from the checkpoint's ``spiece_model`` tensor (Wan's ``umt5_xxl_*.safetensors``
carry it), so ``</s>`` typed in a prompt is plain text here, where T5 v1.1's tokenizer
reads it as the end token.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

from .batch import PromptByPromptMixin
from .registry import Family, Role, register_family
from .sd1_clip import SD1ClipModel, SD1Tokenizer
from .sd3_clip import empty_t5_tokens
from .t5 import UMT5XXlModel, UMT5XXlTokenizer

__all__ = ["WanT5Tokenizer", "WanT5Model", "te", "WAN_T5_MIN_LENGTH"]

#: ComfyUI pads Wan's prompt to at least 512 tokens.
WAN_T5_MIN_LENGTH = 512


class WanT5Tokenizer(SD1Tokenizer):
    """``{"umt5xxl": [sequence]}`` (ComfyUI's ``WanT5Tokenizer``; its tokenizer is ``clip_umt5xxl``).

    Args:
        tokenizer_data: ``{"spiece_model": uint8 tensor}`` from the checkpoint (ComfyUI's way).
        spiece_model: the SentencePiece model otherwise (a ``spiece.model`` path, its
            bytes or a uint8 tensor).
        kwargs: :class:`~textenc.text_encoders.t5.UMT5XXlTokenizer`'s.

    Raises:
        CheckpointError: no SentencePiece model was found or given.
    """

    def __init__(self, embedding_directory=None, tokenizer_data: Mapping | None = None, *,
                 spiece_model: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("min_length", WAN_T5_MIN_LENGTH)
        tokenizer = (UMT5XXlTokenizer if spiece_model is None
                     else functools.partial(UMT5XXlTokenizer, tokenizer=spiece_model))
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                         clip_name="umt5xxl", tokenizer=tokenizer, **kwargs)

    @classmethod
    def for_roles(cls, arguments: Mapping[str, Mapping[str, Any]], *, embedding_directory=None) -> "WanT5Tokenizer":
        """From ``{"umt5xxl": arguments}`` (:class:`~textenc.text_encoders.t5.UMT5XXlTokenizer`'s:
        ``tokenizer=`` is the SentencePiece model)."""
        arguments = dict(arguments.get("umt5xxl") or {})
        return cls(embedding_directory=embedding_directory, spiece_model=arguments.pop("tokenizer", None),
                   **arguments)


class WanT5Model(PromptByPromptMixin, SD1ClipModel):
    """Holds ``umt5xxl`` (ComfyUI's ``WanT5Model``); ``encode_token_weights`` → ``(cond [1, T, 4096], None)``."""

    t5_min_length = WAN_T5_MIN_LENGTH

    def __init__(self, device="cpu", dtype=None, model_options: Mapping | None = None, **kwargs: Any) -> None:
        super().__init__(device=device, dtype=dtype, model_options=model_options, name="umt5xxl",
                         clip_model=UMT5XXlModel, **kwargs)

    @classmethod
    def for_roles(cls, configs: Mapping[str, Any], *, device="cpu", dtype=None) -> "WanT5Model":
        """From ``{"umt5xxl": T5 config}``."""
        return cls(device=device, dtype=dtype, textmodel_json_config=configs["umt5xxl"])

    def empty_tokens(self) -> dict[str, list]:
        return {"umt5xxl": empty_t5_tokens(self.t5_min_length)}


def te(**_ignored: Any) -> type:
    """ComfyUI's factory (``dtype_t5``, ``t5_quantization_metadata`` are read from the file here)."""
    return WanT5Model


#: Wan 2.1 / 2.2: UMT5-XXL, masked, zeroed after </s>; no pooled. diffusers' WanPipeline
#: holds it as text_encoder (a UMT5EncoderModel).
WAN = register_family(Family(
    "wan", "Wan",
    roles=(Role("umt5xxl", UMT5XXlModel, UMT5XXlTokenizer, encoder="umt5", attribute_name="umt5xxl",
                min_length=WAN_T5_MIN_LENGTH),),
    model_class=WanT5Model, tokenizer_class=WanT5Tokenizer, comfy_default_layer=-1,
    diffusers_default_layer=-1, pipeline_prefix="Wan", diffusers_pooled=False,
    unequal_lengths="keep"))
