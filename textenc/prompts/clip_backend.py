"""The Rust ``tokenizers`` backend built to match ``transformers.CLIPTokenizer``.

Kept apart from :mod:`textenc.prompts.tokenizer`: building the pipeline is one concern,
ComfyUI's window packing another.
"""

from __future__ import annotations

import json
import os
from typing import Any

from textenc.errors import PromptError

__all__ = ["CLIP_SPLIT", "build_backend", "is_clip_pipeline", "fix_surrogates"]

# The CLIP pre-tokenizer regex, as in transformers' CLIPTokenizer.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def fix_surrogates(text: str) -> str:
    """Join surrogate pairs and replace lone surrogates by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def build_backend(folder: str) -> Any:
    """A ``tokenizers.Tokenizer`` equal to transformers' CLIPTokenizer for ``folder``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    single = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(single) and not os.path.isfile(os.path.join(folder, "vocab.json")):
        backend = Tokenizer.from_file(single)
        backend.no_truncation()  # once, at construction: never mutated per call
        backend.no_padding()
        return backend
    try:
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as handle:
            vocab = json.load(handle)
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as handle:
            merges = [tuple(line.split()) for line in handle.read().split("\n")[1:] if line.strip()]
    except (OSError, ValueError) as error:
        raise PromptError(f"cannot read a CLIP vocabulary from {folder!r}: {error}") from error
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token="<|endoftext|>"))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<|startoftext|>", "<|endoftext|>")])
    bos, eos = backend.token_to_id("<|startoftext|>"), backend.token_to_id("<|endoftext|>")
    backend.post_processor = processors.RobertaProcessing(("<|endoftext|>", eos), ("<|startoftext|>", bos),
                                                          trim_offsets=False, add_prefix_space=False)
    return backend


def is_clip_pipeline(backend: Any) -> bool:
    """Whether a backend normalises and splits exactly like CLIP, so it can run word by word."""
    # The two parts alone: serialising the whole tokenizer (``to_str``) writes and
    # parses its vocabulary and merges too, 70 ms of every CLIP load.
    normalizer = _settings(backend.normalizer)
    steps = [step.get("type") for step in normalizer.get("normalizers", [])]
    pre = _settings(backend.pre_tokenizer).get("pretokenizers") or [{}]
    pattern = (pre[0].get("pattern") or {}).get("Regex")
    replace = (normalizer.get("normalizers") or [{}, {}])[1:2]
    whitespace_only = replace and replace[0].get("pattern", {}).get("Regex") == r"\s+" and replace[0].get("content") == " "
    return steps == ["NFC", "Replace", "Lowercase"] and bool(whitespace_only) and pattern == CLIP_SPLIT


def _settings(part: Any) -> dict:
    """A tokenizer part's settings (its JSON, as in ``tokenizer.json``); {} for none."""
    return (json.loads(part.__getstate__()) or {}) if part is not None else {}
