"""A SentencePiece tokenizer read from model bytes: UMT5's (Wan), which travels inside the checkpoint.

Wan's ``umt5_xxl`` text-encoder files carry the serialized SentencePiece model
as a 1-D uint8 tensor named ``spiece_model``; ComfyUI reads it with the
``sentencepiece`` package (``comfy/text_encoders/spiece_tokenizer.py``,
``add_eos=True``) and so does :class:`SentencePieceTokenizer`. It has the small
interface :class:`~textenc.prompts.tokenizer.SDTokenizer` asks of a
``tokenizer_class`` (``from_pretrained``, ``__call__`` → ``{"input_ids": ...}``,
``get_vocab``), so the prompt rules on top are the same as CLIP's.

Model bytes are parsed by ``sentencepiece`` (a protobuf, never pickle); a file
path, when given, is read as such and nothing else is opened.
"""

from __future__ import annotations

import os
from typing import Union

import torch

from ..errors import CheckpointError

__all__ = ["SentencePieceTokenizer", "SPIECE_KEY", "model_bytes"]

#: State-dict key of the serialized SentencePiece model in UMT5 checkpoints (Wan).
SPIECE_KEY = "spiece_model"

ModelSource = Union[bytes, bytearray, torch.Tensor, str, os.PathLike]


def model_bytes(source: ModelSource) -> bytes:
    """The serialized model from a uint8 tensor (as stored in checkpoints), bytes or a file path.

    Raises:
        CheckpointError: a tensor that is not 1-D uint8, or a path that is not a file.
    """
    if isinstance(source, torch.Tensor):
        if source.dtype != torch.uint8 or source.dim() != 1:
            raise CheckpointError(f"{SPIECE_KEY!r} must be a 1-D uint8 tensor (a serialized SentencePiece "
                                  f"model), got dtype {source.dtype} and shape {tuple(source.shape)}")
        return source.detach().cpu().contiguous().numpy().tobytes()
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise CheckpointError(f"SentencePiece model {path!r} is not a file")
    with open(path, "rb") as handle:
        return handle.read()


class SentencePieceTokenizer:
    """SentencePiece ids with ``</s>`` appended (ComfyUI's ``SPieceTokenizer``).

    Args:
        source: the serialized model (uint8 tensor, bytes or a file path).
        add_bos, add_eos: add the model's start / end id to every encoding
            (ComfyUI: no start, end added).

    Raises:
        CheckpointError: the bytes are not a SentencePiece model.
    """

    def __init__(self, source: ModelSource, *, add_bos: bool = False, add_eos: bool = True) -> None:
        import sentencepiece  # a dependency; imported here so CLIP-only use never loads it

        self._bytes = model_bytes(source)
        self.add_bos, self.add_eos = add_bos, add_eos
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_proto=self._bytes, add_bos=add_bos,
                                                                  add_eos=add_eos)
        except (RuntimeError, TypeError, ValueError) as error:
            raise CheckpointError(f"{SPIECE_KEY!r} is not a valid SentencePiece model ({len(self._bytes)} "
                                  f"bytes): {error}; the file is corrupt or not a UMT5 text encoder") from None

    @classmethod
    def from_pretrained(cls, source: ModelSource, **kwargs) -> "SentencePieceTokenizer":
        """The ``SDTokenizer(tokenizer_class=...)`` constructor (as transformers' tokenizers)."""
        return cls(source, **kwargs)

    def __call__(self, text: str | list[str]) -> dict[str, list]:
        """``{"input_ids": ids}`` of one text, or a list of id lists for a list of texts."""
        return {"input_ids": self.processor.encode(text)}

    def get_vocab(self) -> dict[str, int]:
        return {self.processor.id_to_piece(i): i for i in range(self.processor.get_piece_size())}

    def serialize_model(self) -> torch.Tensor:
        """The model as the uint8 tensor checkpoints store (ComfyUI's ``state_dict`` of the tokenizer)."""
        return torch.frombuffer(bytearray(self._bytes), dtype=torch.uint8)
