"""T5-XXL (SD3, SD3.5, Flux, ...) and UMT5-XXL (Wan) text encoders and tokenizers, ComfyUI's names.

As ``comfy/text_encoders/sd3_clip.py`` (``T5XXLModel``, ``T5XXLTokenizer``) and
``comfy/text_encoders/wan.py`` (``UMT5XXlModel``, ``UMT5XXlTokenizer``): the
encoders are :class:`~textenc.text_encoders.sd1_clip.SDClipModel` around
:class:`textenc.nn.t5.T5`, the tokenizers
:class:`~textenc.prompts.tokenizer.SDTokenizer` with T5's rules, so prompt
weights, escapes and ``embedding:`` work as for CLIP:

* no start token; ``</s>`` (1) ends the prompt; padding is 0;
* no 77-token windows: one sequence of any length, padded to ``min_length``
  (the family sets it: SD3 77, Flux 256, Wan 512);
* every weighted segment is tokenized on its own, without its trailing ``</s>``;
  the empty prompt is ``[1, 0, ...]``;
* a weighted prompt is ``(z - z_empty) * w + z_empty`` against the empty
  prompt's encoding of the same length (cached per length by ``SDClipModel``);
* T5 has no pooled output (None).

ComfyUI's mask use differs per model, and the family chooses it: SD3 and Flux
run T5 unmasked (padding is attended); Wan runs UMT5 masked and zeroes the
rows after ``</s>``. Both are constructor options here.

The config is the released XXL one by default; :meth:`T5XXLModel.from_state_dict`
reads it from the weights' shapes instead (a tiny model loads the same way).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from ..errors import CheckpointError
from ..nn.t5 import T5
from ..nn.t5_config import T5Config, t5_config_from_state_dict
from ..prompts.spiece import SPIECE_KEY, SentencePieceTokenizer
from ..prompts.tokenizer import SDTokenizer
from .sd1_clip import SDClipModel

__all__ = ["T5XXLModel", "T5XXLTokenizer", "UMT5XXlModel", "UMT5XXlTokenizer", "T5_SPECIAL_TOKENS",
           "T5_VOCAB", "T5_MAX_LENGTH", "strip_tokenizer_keys"]

#: ``</s>`` ends the prompt, ``<pad>`` pads it; there is no start token.
T5_SPECIAL_TOKENS = {"end": 1, "pad": 0}
#: The bundled T5 v1.1 tokenizer folder (``tokenizer.json``; see its README).
T5_VOCAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vocab", "t5")
#: ComfyUI's "no limit" window length for T5 (``max_length=99999999``): one window per prompt.
T5_MAX_LENGTH = 99999999
#: transformers writes the tied input embedding twice in some T5 files; ``shared.weight`` is the one used.
_TIED_EMBEDDING_KEY = "encoder.embed_tokens.weight"


def strip_tokenizer_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of a T5 state dict: without UMT5's ``spiece_model`` (tokenizer data, uint8)
    and with transformers' duplicate ``encoder.embed_tokens.weight`` used only when
    ``shared.weight`` is missing."""
    out = {k: v for k, v in sd.items() if k not in (SPIECE_KEY, _TIED_EMBEDDING_KEY)}
    if _TIED_EMBEDDING_KEY in sd and "shared.weight" not in sd:
        out["shared.weight"] = sd[_TIED_EMBEDDING_KEY]
    return out


class _T5ClipModel(SDClipModel):
    """``SDClipModel`` around :class:`~textenc.nn.t5.T5`; subclasses set the defaults."""

    default_config = "t5_xxl"

    def __init__(self, device="cpu", layer: str = "last", layer_idx: int | None = None,
                 dtype: torch.dtype | None = None, attention_mask: bool = False,
                 model_options: Mapping | None = None, *, zero_out_masked: bool = False,
                 textmodel_json_config: T5Config | str | dict | None = None,
                 return_attention_masks: bool | None = None, **kwargs: Any) -> None:
        super().__init__(device=device, layer=layer, layer_idx=layer_idx,
                         textmodel_json_config=textmodel_json_config or self.default_config, dtype=dtype,
                         model_class=T5, special_tokens=T5_SPECIAL_TOKENS, enable_attention_masks=attention_mask,
                         zero_out_masked=zero_out_masked,
                         return_attention_masks=attention_mask if return_attention_masks is None
                         else return_attention_masks,
                         model_options=model_options, **kwargs)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], *, strict: bool = True,
                        require_finite: bool = True, **kwargs: Any) -> "_T5ClipModel":
        """An encoder shaped as ``sd`` says (:func:`~textenc.nn.t5_config.t5_config_from_state_dict`), loaded.

        Raises:
            CheckpointError: keys or shapes that do not make a T5 encoder.
        """
        weights = strip_tokenizer_keys(sd)
        model = cls(textmodel_json_config=t5_config_from_state_dict(weights), **kwargs)
        model.load_sd(weights, strict=strict, require_finite=require_finite)
        return model

    def encode_token_weights(self, token_weight_pairs, *, options: Mapping[str, Any] | None = None,
                             need_pooled: bool = True):
        """``(cond [1, T, D], None)``: see :meth:`SDClipModel.encode_token_weights`. T5 has no pooled
        output, so the work only pooled needs (compel's raw-text window) is always skipped.

        No windows at all (SD3's ``CLIPTextEncodeSD3`` with an empty ``t5xxl`` and
        ``empty_padding="none"``) encode ``</s>`` alone, one row, as ComfyUI's
        ``ClipTokenWeightEncoder`` does (``gen_empty_tokens(special_tokens, 0)``)."""
        if isinstance(token_weight_pairs, (list, tuple)) and len(token_weight_pairs) == 0:
            token_weight_pairs = [[(self.special_tokens["end"], 1.0)]]
        return super().encode_token_weights(token_weight_pairs, options=options, need_pooled=False)

    def load_sd(self, sd: Mapping[str, torch.Tensor], *, strict: bool = True, require_finite: bool = True):
        """Load HF-layout T5 weights (``shared.weight``, ``encoder.*``); see :meth:`SDClipModel.load_sd`.

        ``spiece_model`` (the UMT5 tokenizer a Wan file carries) is not a weight and is skipped.
        """
        return super().load_sd(strip_tokenizer_keys(sd), strict=strict, require_finite=require_finite)


class T5XXLModel(_T5ClipModel):
    """T5 v1.1 XXL as SD3, SD3.5 and Flux use it (ComfyUI's ``T5XXLModel``).

    Args:
        attention_mask: mask padding inside the encoder and return the mask
            (ComfyUI's ``t5_attention_mask``; SD3 and Flux default to False).
        zero_out_masked: zero the rows after ``</s>``.
        textmodel_json_config: the config (default the released ``t5_xxl``).
        Others as :class:`~textenc.text_encoders.sd1_clip.SDClipModel`.
    """

    default_config = "t5_xxl"


class UMT5XXlModel(_T5ClipModel):
    """UMT5-XXL as Wan uses it (ComfyUI's ``UMT5XXlModel``): masked, rows after ``</s>`` zeroed.

    ``return_attention_masks`` stays False by default, as ComfyUI's.
    """

    default_config = "umt5_xxl"

    def __init__(self, device="cpu", layer: str = "last", layer_idx: int | None = None,
                 dtype: torch.dtype | None = None, attention_mask: bool = True,
                 model_options: Mapping | None = None, *, zero_out_masked: bool = True,
                 return_attention_masks: bool = False, **kwargs: Any) -> None:
        super().__init__(device=device, layer=layer, layer_idx=layer_idx, dtype=dtype,
                         attention_mask=attention_mask, model_options=model_options,
                         zero_out_masked=zero_out_masked, return_attention_masks=return_attention_masks,
                         **kwargs)


class T5XXLTokenizer(SDTokenizer):
    """The T5 v1.1 tokenizer with ComfyUI's rules (``T5XXLTokenizer``); the bundled vocabulary.

    Args:
        min_length: pad the prompt to at least this many tokens (SD3 77, Flux 256;
            ``tokenizer_data["t5xxl_min_length"]`` or the per-call
            ``tokenizer_options`` override it, as in ComfyUI).
        tokenizer_path: a folder with another ``tokenizer.json``.
        Others as :class:`~textenc.prompts.tokenizer.SDTokenizer`.

    >>> [t for t, _ in T5XXLTokenizer(min_length=10).tokenize_with_weights("a photo of a cat")[0]]
    [3, 9, 1202, 13, 3, 9, 1712, 1, 0, 0]
    """

    syntaxes = ("comfy",)
    syntax_scope = ("a T5 text encoder on its own: A1111 reads T5 only as part of SD3 (its webui) and "
                    "Flux (Forge), and compel only as part of Flux (CompelForFlux), through those "
                    "families' tokenizers")

    def __init__(self, embedding_directory=None, tokenizer_data: Mapping | None = None, min_length: int = 77,
                 max_length: int = T5_MAX_LENGTH, *, tokenizer_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(tokenizer_path or T5_VOCAB, max_length=max_length, pad_with_end=False,
                         embedding_directory=embedding_directory, embedding_size=4096, embedding_key="t5xxl",
                         has_start_token=False, pad_to_max_length=False, min_length=min_length,
                         tokenizer_data=dict(tokenizer_data or {}), embedding_any_width=True, **kwargs)


class UMT5XXlTokenizer(SDTokenizer):
    """The UMT5 tokenizer with ComfyUI's rules (``UMT5XXlTokenizer``), from the checkpoint's SentencePiece model.

    Args:
        tokenizer_data: ``{"spiece_model": uint8 tensor}`` as the Wan file stores it
            (ComfyUI passes the file's ``spiece_model`` this way).
        tokenizer: the model (uint8 tensor, bytes or file path) when the file has none.
        min_length: pad to at least this many tokens (Wan: 512).

    Raises:
        CheckpointError: neither ``tokenizer_data["spiece_model"]`` nor ``tokenizer``
            was given, or it is not a SentencePiece model.
    """

    syntaxes = ("comfy",)
    syntax_scope = ("UMT5 (Wan): neither A1111 nor Forge nor compel defines a Wan reading")

    def __init__(self, embedding_directory=None, tokenizer_data: Mapping | None = None, min_length: int = 512,
                 max_length: int = T5_MAX_LENGTH, *, tokenizer: Any = None, **kwargs: Any) -> None:
        tokenizer_data = dict(tokenizer_data or {})
        source = tokenizer if tokenizer is not None else tokenizer_data.get(SPIECE_KEY)
        if source is None:
            raise CheckpointError(
                f"this UMT5 text encoder has no tokenizer: the file holds no {SPIECE_KEY!r} tensor (Wan's "
                "umt5_xxl files carry it) and none was given; pass tokenizer=<SentencePiece model: a "
                "spiece.model path, its bytes or a uint8 tensor>, or use a file that includes it")
        super().__init__(source, max_length=max_length, pad_with_end=False, embedding_directory=embedding_directory,
                         embedding_size=4096, embedding_key="umt5xxl", tokenizer_class=SentencePieceTokenizer,
                         has_start_token=False, pad_to_max_length=False, min_length=min_length, pad_token=0,
                         tokenizer_data=tokenizer_data, embedding_any_width=True, **kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"spiece_model": uint8 tensor}``: the tokenizer travels with the weights (ComfyUI API)."""
        return {SPIECE_KEY: self._hf.serialize_model()}
