"""The T5 / UMT5 text encoder of an SD3, Flux or Wan pipeline, read for textenc.

Part of :mod:`textenc.diffusers` (used by :mod:`textenc.diffusers.load`). diffusers holds it
as a transformers ``T5EncoderModel`` (SD3's ``text_encoder_3``, Flux's ``text_encoder_2``)
or ``UMT5EncoderModel`` (Wan's ``text_encoder``), whose state dict is the Hugging Face
layout textenc's T5 loads as it is. Its tokenizer:

* T5 v1.1: the folder's ``tokenizer.json`` (transformers' ``T5TokenizerFast``), read by
  :class:`~textenc.text_encoders.t5.T5XXLTokenizer` (``tokenizer_path``);
* UMT5: the folder's ``spiece.model`` (Wan's ``google/umt5-xxl`` tokenizer), read by
  :class:`~textenc.text_encoders.t5.UMT5XXlTokenizer` (``tokenizer``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError, DiffusersLayoutError
from ..nn.t5_config import T5Config, load_t5_config

__all__ = ["t5_config", "t5_tokenizer_arguments", "t5_model_max_length", "copy_spiece_model", "SPIECE_FILE"]

#: The SentencePiece model file transformers' T5 tokenizers save beside ``tokenizer.json``.
SPIECE_FILE = "spiece.model"
_T5_KEYS = ("model_type", "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
            "feed_forward_proj", "dense_act_fn", "is_gated_act", "relative_attention_num_buckets",
            "relative_attention_max_distance", "layer_norm_epsilon")


def t5_config(hf_config: Mapping[str, Any], *, source: str) -> T5Config:
    """textenc's T5 config from a transformers ``T5Config`` / ``UMT5Config`` dict.

    Raises:
        DiffusersLayoutError: not a T5 / UMT5 config, or one textenc's T5 cannot run.
    """
    if hf_config.get("model_type") not in ("t5", "umt5"):
        raise DiffusersLayoutError(f"{source}: model_type {hf_config.get('model_type')!r} is not a T5 or "
                                   "UMT5 text encoder")
    # Only the shape and activation keys: transformers' configs carry many more (labels,
    # generation and decoder settings) that an encoder does not use.
    data = {key: hf_config[key] for key in _T5_KEYS if hf_config.get(key) is not None}
    if "dense_act_fn" in data and "feed_forward_proj" in data:
        del data["feed_forward_proj"]  # transformers writes both; dense_act_fn is the resolved one
    try:
        return load_t5_config(data)
    except ConfigError as exc:
        raise DiffusersLayoutError(f"{source}: {exc}") from exc


def t5_tokenizer_arguments(folder: Path, config: T5Config) -> dict[str, Any]:
    """The tokenizer arguments of a T5 role from a (saved) tokenizer folder.

    Raises:
        DiffusersLayoutError: no ``tokenizer.json`` (T5) or ``spiece.model`` (UMT5) in it.
    """
    if config.model_type == "umt5":
        spiece = folder / SPIECE_FILE
        if not spiece.is_file():
            raise DiffusersLayoutError(f"{folder}: no {SPIECE_FILE}; textenc reads UMT5's SentencePiece "
                                       "model from it (google/umt5-xxl's tokenizer folder has one)")
        return {"tokenizer": str(spiece)}
    if not (folder / "tokenizer.json").is_file():
        raise DiffusersLayoutError(f"{folder}: no tokenizer.json; textenc reads the T5 tokenizer from it")
    return {"tokenizer_path": str(folder)}


def t5_model_max_length(folder: Path) -> int | None:
    """The tokenizer folder's ``model_max_length`` (``tokenizer_config.json``; FLUX.1's
    ``tokenizer_2``: 512), which compel reads as its chunk length; None when the file gives none
    or transformers' "no limit" (a huge number)."""
    try:
        value = json.loads((folder / "tokenizer_config.json").read_text("utf-8")).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 1_000_000:
        return value
    return None


def copy_spiece_model(tokenizer: Any, folder: Path) -> None:
    """Put the SentencePiece model a loaded tokenizer was read from into ``folder`` (transformers 5
    saves ``tokenizer.json`` only; UMT5's tokenizer here needs ``spiece.model``)."""
    source = getattr(tokenizer, "vocab_file", None)
    target = folder / SPIECE_FILE
    if not target.exists() and isinstance(source, str) and os.path.isfile(source):
        shutil.copyfile(source, target)
