"""The text clean-up AUTOMATIC1111's tokenizers apply before BPE.

A1111 pins transformers 4.30.2 and open-clip-torch 2.20.0, and open-clip-torch
installs ftfy. Its CLIP-L tokenizer (SD1, SDXL) is transformers' slow
``CLIPTokenizer``, its OpenCLIP one (SD2, SDXL-G) is open_clip's ``SimpleTokenizer``.
With ftfy installed, both turn a piece of prompt into BPE words like this (facts from
their ``tokenization_clip.py`` / ``tokenizer.py``; an independent implementation):

1. CLIP-L only: the text is first cut at the literal special tokens
   ``<|startoftext|>`` / ``<|endoftext|>`` (the tokenizer's added tokens), and each
   part is cleaned on its own.
2. ``ftfy.fix_text`` with its defaults: curly quotes become straight, full-width
   characters ASCII, ligatures letters; control characters are dropped, mojibake is
   repaired, HTML entities are unescaped when the part holds no ``<``, then NFC.
3. OpenCLIP only: ``html.unescape`` twice, then surrounding white space is stripped.
4. White space runs (``regex``'s ``\\s+``) become one space; strip; lower case.
5. CLIP's split regex, whose first alternatives are the special tokens (CLIP-L:
   ``<|startoftext|>``, ``<|endoftext|>``; OpenCLIP: ``<start_of_text>``,
   ``<end_of_text>``), gives the words that BPE encodes.

ComfyUI's tokenizer (``syntax="comfy"``) does none of this: it is transformers'
current ``CLIPTokenizer``, which never calls ftfy.

Checked against those tokenizers themselves by ``tests/test_a1111_text.py``. A lone
surrogate becomes U+FFFD (A1111 raises). Characters newer than Python's Unicode
database may be split or lower-cased differently, as they are between Python versions.
"""

from __future__ import annotations

import functools
import html
import re
from typing import Iterator, Sequence

import ftfy
import regex

from .budget import space_chunks
from .vocabulary import Vocabulary

__all__ = ["clean_text", "split_words", "encode_a1111", "encode_a1111_lazily", "uses_open_clip"]

_START, _END = "<|startoftext|>", "<|endoftext|>"
_OPEN_CLIP_NAMES = {"<start_of_text>": _START, "<end_of_text>": _END}
_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_HF_SPLIT = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|" + _WORDS, regex.IGNORECASE)
_OPEN_CLIP_SPLIT = regex.compile(r"<start_of_text>|<end_of_text>|" + _WORDS, regex.IGNORECASE)
_HF_SPECIAL = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_WHITESPACE = regex.compile(r"\s+")
# Text ftfy and the HTML/white-space clean-up leave as it is, up to white space and case,
# which the Rust backend normalises the same way: printable ASCII without "&" (entities)
# or "<" (special-token look-alikes), plus tab and newline.
_PLAIN = re.compile(r"[\t\n\x20-\x25\x27-\x3b\x3d-\x7e]*")
_CACHED_CHARS = 1024  # ftfy costs ~0.2 ms a piece: short pieces (schedules repeat them) are remembered


def uses_open_clip(tokenizer: Vocabulary) -> bool:
    """Whether A1111 reads this tokenizer's model with open_clip (SD2, SDXL-G: padded with 0)."""
    return not tokenizer.pad_with_end


def clean_text(text: str, *, open_clip: bool = False) -> str:
    """``text`` as A1111's tokenizer hands it to its split regex (steps 2-4 above).

    >>> clean_text("\\u201cCat\\u201d  &amp; \\uff24\\uff4f\\uff47")
    '"cat" & dog'
    """
    text = ftfy.fix_text(text)
    if open_clip:
        text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def split_words(text: str, *, open_clip: bool = False) -> list[str]:
    """The BPE words A1111's tokenizer makes of ``text``; special tokens come back as
    ``<|startoftext|>`` / ``<|endoftext|>`` whichever tokenizer it is.

    >>> split_words("A \\ufb01sh, <|endoftext|>")
    ['a', 'fish', ',', '<|endoftext|>']
    >>> split_words("<|endoftext|>", open_clip=True)
    ['<|', 'endoftext', '|>']
    """
    if open_clip:
        return [_OPEN_CLIP_NAMES.get(word.lower(), word)
                for word in _OPEN_CLIP_SPLIT.findall(clean_text(text, open_clip=True))]
    words: list[str] = []
    for part in _HF_SPECIAL.split(text):
        words += [part] if part in (_START, _END) else _HF_SPLIT.findall(clean_text(part))
    return words


@functools.lru_cache(maxsize=4096)
def _cached_words(text: str, open_clip: bool) -> tuple[str, ...]:
    return tuple(split_words(text, open_clip=open_clip))


def _words(text: str, open_clip: bool) -> Sequence[str]:
    return _cached_words(text, open_clip) if len(text) <= _CACHED_CHARS else split_words(text, open_clip=open_clip)


def encode_a1111(tokenizer: Vocabulary, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as A1111's tokenizer gives them (no start/end tokens).

    Plain ASCII goes straight to ``tokenizer.encode_units``; other text is cleaned and
    split here, and each distinct word is encoded once (through the same BPE).
    """
    open_clip = uses_open_clip(tokenizer)
    plain = [_PLAIN.fullmatch(text) is not None for text in texts]
    word_lists = [() if is_plain else _words(text, open_clip) for text, is_plain in zip(texts, plain)]
    direct = iter(tokenizer.encode_units([text for text, is_plain in zip(texts, plain) if is_plain]))
    unique = list(dict.fromkeys(word for words in word_lists for word in words))
    table = dict(zip(unique, tokenizer.encode_units(unique))) if unique else {}
    return [next(direct) if is_plain else [t for word in words for t in table[word]]
            for is_plain, words in zip(plain, word_lists)]


def encode_a1111_lazily(tokenizer: Vocabulary, texts: Sequence[str], *, first_chars: int = 1 << 12,
                        batch_chars: int = 1 << 14) -> Iterator[Iterator[list[int]]]:
    """:func:`encode_a1111` a batch at a time, the first of about ``first_chars``
    characters, each next one twice as large up to ``batch_chars``: a caller that
    refuses a prompt part way pays only for about twice the part it read.

    Yields, for each text in order, its token ids as consecutive runs (their
    concatenation is ``encode_a1111(tokenizer, [text])[0]``). A plain text longer than
    the batch for a CLIP pipeline is cut where its tokens do not change
    (:func:`textenc.prompts.budget.space_chunks`) and encoded a cut at a time, as its
    runs are read.
    """
    start, size = 0, first_chars
    while start < len(texts):
        end, used = start, 0
        while end < len(texts) and used <= size and len(texts[end]) <= size:
            used += len(texts[end])
            end += 1
        if end == start:  # one long text on its own
            yield _long_runs(tokenizer, texts[start], size, batch_chars)
            start += 1
        else:
            yield from (iter((ids,)) for ids in encode_a1111(tokenizer, texts[start:end]))
            start = end
        size = min(2 * size, batch_chars)


def _long_runs(tokenizer: Vocabulary, text: str, size: int, most: int) -> Iterator[list[int]]:
    if not (tokenizer.splits_at_spaces and _PLAIN.fullmatch(text) is not None):
        yield encode_a1111(tokenizer, [text])[0]  # ftfy reads the whole text (it may join across a cut)
        return
    start = 0
    while start < len(text):
        part = next(space_chunks(text[start:], size))
        yield tokenizer.encode_units([part])[0]
        start += len(part)
        size = min(2 * size, most)
