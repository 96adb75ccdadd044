"""compel's token layout: fragments → 77-token chunks, and which positions each
down-weighted fragment masks.

Facts from compel 2.5.1 (``embeddings_provider.py``), code textenc's:

* every fragment is tokenized on its own and the ids are concatenated;
* a chunk is :func:`compel_length` tokens (CLIP 77; a T5 tokenizer's
  ``compel_max_length``, compel's ``tokenizer.model_max_length``), and a
  tokenizer without a start token (T5) has none in its chunks: ``[ids, end, pad...]``;
* ``truncate_long_prompts=True`` (compel's default) keeps the first
  ``max_length - 2`` ids (T5: ``max_length - 1``): one chunk ``[start, ids, end, pad...]``;
* ``truncate_long_prompts=False`` cuts chunks of at most ``max_length - 2`` ids,
  after the last ``.`` that fits, else the last ``, . ; :``, else the last whole
  word, else at the limit (compel's ``SplitLongTextMode.SENTENCES``);
* a fragment's masked positions run from its first to its last token; across a
  chunk edge they include the end/pad/start tokens between, except each chunk's
  first and last position. When truncation cuts a fragment, its range runs to
  the final position (the end token), which is then masked too.

Each token is a :class:`CompelToken`: a plain ``(token, weight)`` or
``(token, weight, word_id)`` tuple (what ComfyUI callers read) that also carries
``.compel``, a :class:`CompelTag` the ``compel`` weight mode reads. The tag also
holds the window compel's ``requires_pooled`` encodes for the pooled output: the
raw prompt text, syntax characters included, cut to ``max_length - 2`` ids
(``Compel.build_conditioning_tensor`` → ``get_pooled_embeddings([text])``).
"""

from __future__ import annotations

from itertools import chain
from typing import Iterator, NamedTuple, Optional, Sequence

from ....errors import PromptError, PromptWarning
from ....warn import warn_at_caller
from ...budget import space_chunks
from ...vocabulary import Vocabulary
from .grammar import CompelPrompt, Member, Part

__all__ = ["CompelTag", "CompelToken", "CompelLayout", "compel_layout", "compel_windows", "truncation_message",
           "TRUNCATION_WARNING", "pooled_window", "split_point", "compel_length", "chunk_capacity"]

#: How :func:`truncation_message` starts (for code that groups these warnings).
TRUNCATION_WARNING = "syntax='compel' dropped "

SENTENCE_END = (".</w>",)
PHRASE_END = (".</w>", ",</w>", ";</w>", ":</w>")
_PIECE_CHARS = 1 << 13  # text tokenized per step while counting up to the cap


class CompelTag(NamedTuple):
    """Where a token sits in a compel prompt (read by ``weight_mode="compel"``)."""

    part: int                        # index in the ``.and()`` conjunction
    part_weight: float               # its ``.and()`` weight
    member: int                      # index in the part's ``.blend()`` (0 when no blend)
    blend_weight: Optional[float]    # None when the part is not a blend
    normalize: bool                  # the blend normalizes its weights
    fragment: int                    # down-weighted fragment masked here, -1 for none
    fragment_weight: float           # that fragment's weight (1.0 when none)
    pooled_window: Optional[tuple[int, ...]] = None  # the raw text's window, pooled as compel does


class CompelToken(tuple):
    """A ComfyUI token tuple with a :class:`CompelTag` in ``.compel``."""

    compel: CompelTag

    def __new__(cls, values: Sequence, tag: CompelTag) -> "CompelToken":
        token = super().__new__(cls, values)
        token.compel = tag
        return token

    def __reduce__(self):
        return CompelToken, (tuple(self), self.compel)


def compel_length(tokenizer: Vocabulary) -> int:
    """compel's chunk length for ``tokenizer`` (its ``max_token_count``): the tokenizer's
    ``compel_max_length`` when it has one (a T5 tokenizer, whose own ``max_length`` means
    "no windows"; compel takes ``tokenizer.model_max_length``, 512 for Flux's T5), else
    its window length (CLIP's 77)."""
    return getattr(tokenizer, "compel_max_length", None) or tokenizer.max_length


def chunk_capacity(tokenizer: Vocabulary) -> int:
    """Prompt ids one compel chunk holds: its length less the start (if any) and end tokens."""
    return compel_length(tokenizer) - (tokenizer.start_token is not None) - 1


def split_point(token_texts: Sequence[str], limit: int) -> int:
    """compel's chunk end for ids whose vocabulary texts are ``token_texts``."""
    if len(token_texts) <= limit:
        return limit
    head = token_texts[:limit]
    for accept in (lambda t: t in SENTENCE_END, lambda t: t in PHRASE_END, lambda t: t.endswith("</w>")):
        index = next((i for i in range(len(head) - 1, -1, -1) if accept(head[i])), None)
        if index is not None:
            return index + 1
    return limit


class _TooManyChunks(Exception):
    """A member needs more chunks than the windows left (turned into a PromptError)."""


def _too_many_windows(max_windows: Optional[int], length: int) -> PromptError:
    return PromptError(f"prompt needs more than {max_windows} windows of {length} tokens, more than "
                       f"max_windows={max_windows} (syntax='compel'); shorten it, or pass max_windows=None "
                       "(or a larger number) to the tokenizer or to this call")


def _chunk(tokenizer: Vocabulary, ids: list[int], weights: list[float], word_ids: list[int],
           truncate: bool, max_chunks: Optional[int]) -> list[list[tuple[int, float, int]]]:
    """``[start, ids, end, pad...]`` chunks of ``(token, weight, word_id)`` (no start without one);
    refused as soon as there would be more than ``max_chunks`` (None: no limit)."""
    length, limit = compel_length(tokenizer), chunk_capacity(tokenizer)
    start, end, pad = tokenizer.start_token, tokenizer.end_token, tokenizer.pad_token
    head = [(start, 1.0, 0)] if start is not None else []
    chunks, position = [], 0
    while True:
        if max_chunks is not None and len(chunks) >= max_chunks:
            raise _TooManyChunks
        # split_point reads no further than limit + 1 ids: the chunk's own, not the rest of the prompt
        cut = limit if truncate else split_point(
            [tokenizer.inv_vocab.get(i, "") for i in ids[position:position + limit + 1]], limit)
        body = list(zip(ids[position:position + cut], weights[position:position + cut],
                        word_ids[position:position + cut]))
        chunk = head + body + [(end, 1.0, 0)]
        chunks.append(chunk + [(pad, 1.0, 0)] * (length - len(chunk)))
        position += cut
        if truncate or position >= len(ids):
            return chunks


def fragment_ranges(tokens: Sequence[int], fragment_ids: Sequence[Sequence[int]], specials: set[int],
                    truncate: bool, length: int) -> list[Optional[tuple[int, int]]]:
    """compel's ``_get_token_ranges_for_fragments``: (first, last) position per fragment.

    None for a fragment without tokens; the list stops early when truncation
    left no room for the remaining fragments.
    """
    last = len(tokens) - 1
    ranges: list[Optional[tuple[int, int]]] = []
    start = 0
    for index, ids in enumerate(fragment_ids):
        if not ids:
            ranges.append(None)
            continue
        if truncate and start >= length - 1:
            break
        while start < last and tokens[start] != ids[0]:
            start += 1
        start = min(start, last)
        end, matched = start, 0
        while end < last:
            if tokens[end] == ids[matched]:
                matched += 1
                if matched == len(ids):
                    break
                end += 1
            elif not truncate and tokens[end] in specials:
                end += 1
            else:
                raise PromptError(f"compel fragment {index} does not match its tokens")  # pragma: no cover
        if end >= last and not truncate:
            raise PromptError(f"compel fragment {index} runs past the last chunk")  # pragma: no cover
        ranges.append((start, end))
        start = end + 1
    return ranges


def _masked_fragments(member: Member, ranges, truncate: bool, length: int, total: int) -> list[int]:
    """Per position: the index of the down-weighted fragment masking it, or -1."""
    owner = [-1] * total
    for index, span in enumerate(ranges):
        if span is None or member.fragments[index].weight >= 1:
            continue
        for position in range(span[0], span[1] + 1):
            if truncate or position % length not in (0, length - 1):
                owner[position] = index
    return owner


def _batches(tokenizer: Vocabulary, texts: Sequence[str]) -> Iterator[list[tuple[int, str]]]:
    """``(text index, piece)`` lists of about :data:`_PIECE_CHARS` characters, in order;
    a long text is cut (CLIP pipelines only) where its tokens stay as they are."""
    batch, chars = [], 0
    for index, text in enumerate(texts):
        pieces = space_chunks(text, _PIECE_CHARS) if tokenizer.splits_at_spaces else (text,)
        for piece in pieces:
            batch.append((index, piece))
            chars += len(piece)
            if chars >= _PIECE_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def _capped_ids(tokenizer: Vocabulary, texts: Sequence[str], cap: Optional[int]) -> tuple[list[list[int]], bool]:
    """Each text's ids, tokenized a batch at a time until they number more than ``cap``
    (None: all); the rest stays untokenized. Returns the ids and whether that was all."""
    if cap is None:
        return tokenizer.encode_units(list(texts)), True
    ids: list[list[int]] = [[] for _ in texts]
    count = 0
    for batch in _batches(tokenizer, texts):
        if count > cap:
            return ids, False
        for (index, _), piece_ids in zip(batch, tokenizer.encode_units([piece for _, piece in batch])):
            ids[index] += piece_ids
            count += len(piece_ids)
    return ids, True


def _member_windows(tokenizer: Vocabulary, member: Member, truncate: bool, first_word_id: int,
                    max_chunks: Optional[int], cap: Optional[int]):
    """Chunks of one member (no more than ``max_chunks``), per flat position its masking
    fragment, how many of its tokens truncation dropped (each fragment cut to the limit,
    then their sum) and whether that count is exact (truncation counts no further than
    ``cap`` tokens, None: all; past it the count is a lower bound)."""
    length, limit = compel_length(tokenizer), chunk_capacity(tokenizer)
    fragment_ids, exact = _capped_ids(tokenizer, [f.text for f in member.fragments], cap)
    total = sum(len(ids) for ids in fragment_ids)
    if truncate:
        fragment_ids = [ids[:limit] for ids in fragment_ids]
    ids, weights, word_ids = [], [], []
    for index, (fragment, f_ids) in enumerate(zip(member.fragments, fragment_ids)):
        ids += f_ids
        weights += [fragment.weight] * len(f_ids)
        word_ids += [first_word_id + index] * len(f_ids)
    chunks = _chunk(tokenizer, ids, weights, word_ids, truncate, max_chunks)
    flat = [t for chunk in chunks for t, _, _ in chunk]
    specials = {tokenizer.start_token, tokenizer.end_token, tokenizer.pad_token} - {None}
    ranges = fragment_ranges(flat, fragment_ids, specials, truncate, length)
    dropped = total - min(len(ids), limit) if truncate else 0
    return chunks, _masked_fragments(member, ranges, truncate, length, len(flat)), dropped, exact


def _tag(part_index: int, part: Part, member_index: int, fragment: int, member: Member,
         pooled: tuple[int, ...]) -> CompelTag:
    blend = part.blend_weights[member_index] if part.blend_weights is not None else None
    weight = member.fragments[fragment].weight if fragment >= 0 else 1.0
    return CompelTag(part_index, part.weight, member_index, blend, part.normalize, fragment, weight, pooled)


def pooled_window(tokenizer: Vocabulary, text: str) -> tuple[int, ...]:
    """The window compel pools: ``text`` as written (markup included), tokenized as one
    string and cut to ``max_length - 2`` ids: ``(start, ids..., end, pad...)``.

    >>> from textenc.prompts.tokenizer import SDTokenizer
    >>> window = pooled_window(SDTokenizer(), "a (cat)0.5")
    >>> len(window), window[:2], window.count(49407) == 77 - window.index(49407)
    (77, (49406, 320), True)
    """
    ids = list(chain.from_iterable(_capped_ids(tokenizer, [text], tokenizer.max_length - 2)[0]))
    ids = ids[:tokenizer.max_length - 2]
    window = [tokenizer.start_token, *ids, tokenizer.end_token]
    return tuple(window + [tokenizer.pad_token] * (tokenizer.max_length - len(window)))


class CompelLayout(NamedTuple):
    """A compel prompt's windows and what ``truncate_long_prompts=True`` dropped."""

    windows: list[list[CompelToken]]
    dropped: int   # prompt tokens left out by truncation (0 without it)
    total: int     # prompt tokens before truncation, over every part and member
    exact: bool = True  # False: a member was counted only up to the cap, so both are lower bounds


def compel_layout(tokenizer: Vocabulary, prompt: CompelPrompt, *, truncate: bool,
                  return_word_ids: bool, text: str, max_windows: Optional[int] = None) -> CompelLayout:
    """All chunks of all parts and members, in order, as :class:`CompelToken` windows.

    ``text`` is the prompt as written: its :func:`pooled_window` goes into every tag.
    When truncation drops tokens (compel keeps the first ``max_length - 2`` of each
    prompt, and says nothing), a :class:`~textenc.errors.PromptWarning` names how many
    and the option that keeps them. More than ``max_windows`` windows (None: no limit)
    is a :class:`~textenc.errors.PromptError`, raised while chunking, before the tokens
    are made. Truncation counts each member's tokens only up to ``max_windows × (max_length
    - 2)`` (None: all); past that, the warning and ``dropped`` give a lower bound.
    """
    if tokenizer.end_token is None:
        raise PromptError("syntax='compel' needs a tokenizer with an end token (CLIP, T5)")
    # compel pools the raw text only where the encoder has a pooled output (CLIP, with a start token)
    pooled = pooled_window(tokenizer, text) if tokenizer.start_token is not None else None
    length = compel_length(tokenizer)
    windows: list[list[CompelToken]] = []
    word_id, dropped, total, exact = 1, 0, 0, True
    cap = max_windows * chunk_capacity(tokenizer) if truncate and max_windows is not None else None
    for part_index, part in enumerate(prompt.parts):
        for member_index, member in enumerate(part.members):
            budget = None if max_windows is None else max_windows - len(windows)
            try:
                chunks, owners, member_dropped, member_exact = _member_windows(tokenizer, member, truncate,
                                                                               word_id, budget, cap)
            except _TooManyChunks:
                raise _too_many_windows(max_windows, length) from None
            word_id += len(member.fragments)
            dropped += member_dropped
            exact = exact and member_exact
            total += sum(1 for chunk in chunks for _, _, word in chunk if word) + member_dropped
            tags = {}
            for chunk_index, chunk in enumerate(chunks):
                window = []
                for column, values in enumerate(chunk):
                    owner = owners[chunk_index * length + column]
                    if owner not in tags:
                        tags[owner] = _tag(part_index, part, member_index, owner, member, pooled)
                    window.append(CompelToken(values if return_word_ids else values[:2], tags[owner]))
                windows.append(window)
    if dropped:
        fixed = getattr(tokenizer, "compel_truncates", None)  # False refused (Flux): no hint towards it
        message = truncation_message(dropped, total, chunk_capacity(tokenizer), len(windows), exact=exact,
                                     keep_hint=not fixed)
        warn_at_caller(message, PromptWarning)
    return CompelLayout(windows, dropped, total, exact)


def truncation_message(dropped: int, total: int, limit: int, prompts: int, *, exact: bool = True,
                       keep_hint: bool = True) -> str:
    """What :func:`compel_layout` warns of when truncation drops tokens (``exact`` False:
    the counts are lower bounds, the prompt was counted only up to ``max_windows``;
    ``keep_hint`` False: the model's compel wrapper always truncates).

    >>> message = truncation_message(25, 100, 75, 1)
    >>> message.startswith("syntax='compel' dropped 25 of the prompt's 100 tokens"), message[-49:]
    (True, 'pass truncate_long_prompts=False to keep them all')
    >>> truncation_message(25, 100, 75, 1, exact=False)[:66]
    "syntax='compel' dropped at least 25 of the prompt's 100+ tokens (c"
    """
    each = " of each .and()/.blend() prompt" if prompts > 1 else ""
    counts = (f"{dropped} of the prompt's {total} tokens" if exact else
              f"at least {dropped} of the prompt's {total}+ tokens (counted up to max_windows windows' worth)")
    hint = ("pass truncate_long_prompts=False to keep them all" if keep_hint
            else "the model's compel wrapper keeps no more (CompelForFlux truncates)")
    return (f"{TRUNCATION_WARNING}{counts}: compel's truncate_long_prompts=True (the default) keeps the first "
            f"{limit}{each}; {hint}")


def compel_windows(tokenizer: Vocabulary, prompt: CompelPrompt, *, truncate: bool,
                   return_word_ids: bool, text: str, max_windows: Optional[int] = None) -> list[list[CompelToken]]:
    """:func:`compel_layout`'s windows."""
    return compel_layout(tokenizer, prompt, truncate=truncate, return_word_ids=return_word_ids, text=text,
                         max_windows=max_windows).windows
