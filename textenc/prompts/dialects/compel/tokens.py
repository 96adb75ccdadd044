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

from typing import NamedTuple, Optional, Sequence

from ....errors import PromptError, PromptWarning
from ....warn import warn_at_caller
from ...vocabulary import Vocabulary
from .grammar import CompelPrompt, Member, Part

__all__ = ["CompelTag", "CompelToken", "CompelLayout", "compel_layout", "compel_windows", "truncation_message",
           "TRUNCATION_WARNING", "pooled_window", "split_point", "compel_length", "chunk_capacity"]

#: How :func:`truncation_message` starts (for code that groups these warnings).
TRUNCATION_WARNING = "syntax='compel' dropped "

SENTENCE_END = (".</w>",)
PHRASE_END = (".</w>", ",</w>", ";</w>", ":</w>")


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


def _chunk(tokenizer: Vocabulary, ids: list[int], weights: list[float], word_ids: list[int],
           truncate: bool) -> list[list[tuple[int, float, int]]]:
    """``[start, ids, end, pad...]`` chunks of ``(token, weight, word_id)`` (no start without one)."""
    length, limit = compel_length(tokenizer), chunk_capacity(tokenizer)
    start, end, pad = tokenizer.start_token, tokenizer.end_token, tokenizer.pad_token
    head = [(start, 1.0, 0)] if start is not None else []
    chunks, position = [], 0
    while True:
        rest = ids[position:]
        cut = limit if truncate else split_point([tokenizer.inv_vocab.get(i, "") for i in rest], limit)
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


def _member_windows(tokenizer: Vocabulary, member: Member, truncate: bool, first_word_id: int):
    """Chunks of one member, per flat position its masking fragment, and how many of
    its tokens truncation dropped (each fragment cut to the limit, then their sum)."""
    length, limit = compel_length(tokenizer), chunk_capacity(tokenizer)
    fragment_ids = tokenizer.encode_units([f.text for f in member.fragments])
    total = sum(len(ids) for ids in fragment_ids)
    if truncate:
        fragment_ids = [ids[:limit] for ids in fragment_ids]
    ids, weights, word_ids = [], [], []
    for index, (fragment, f_ids) in enumerate(zip(member.fragments, fragment_ids)):
        ids += f_ids
        weights += [fragment.weight] * len(f_ids)
        word_ids += [first_word_id + index] * len(f_ids)
    chunks = _chunk(tokenizer, ids, weights, word_ids, truncate)
    flat = [t for chunk in chunks for t, _, _ in chunk]
    specials = {tokenizer.start_token, tokenizer.end_token, tokenizer.pad_token} - {None}
    ranges = fragment_ranges(flat, fragment_ids, specials, truncate, length)
    dropped = total - min(len(ids), limit) if truncate else 0
    return chunks, _masked_fragments(member, ranges, truncate, length, len(flat)), dropped


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
    ids = tokenizer.encode_units([text])[0][:tokenizer.max_length - 2]
    window = [tokenizer.start_token, *ids, tokenizer.end_token]
    return tuple(window + [tokenizer.pad_token] * (tokenizer.max_length - len(window)))


class CompelLayout(NamedTuple):
    """A compel prompt's windows and what ``truncate_long_prompts=True`` dropped."""

    windows: list[list[CompelToken]]
    dropped: int   # prompt tokens left out by truncation (0 without it)
    total: int     # prompt tokens before truncation, over every part and member


def compel_layout(tokenizer: Vocabulary, prompt: CompelPrompt, *, truncate: bool,
                  return_word_ids: bool, text: str) -> CompelLayout:
    """All chunks of all parts and members, in order, as :class:`CompelToken` windows.

    ``text`` is the prompt as written: its :func:`pooled_window` goes into every tag.
    When truncation drops tokens (compel keeps the first ``max_length - 2`` of each
    prompt, and says nothing), a :class:`~textenc.errors.PromptWarning` names how many
    and the option that keeps them.
    """
    if tokenizer.end_token is None:
        raise PromptError("syntax='compel' needs a tokenizer with an end token (CLIP, T5)")
    # compel pools the raw text only where the encoder has a pooled output (CLIP, with a start token)
    pooled = pooled_window(tokenizer, text) if tokenizer.start_token is not None else None
    length = compel_length(tokenizer)
    windows: list[list[CompelToken]] = []
    word_id, dropped, total = 1, 0, 0
    for part_index, part in enumerate(prompt.parts):
        for member_index, member in enumerate(part.members):
            chunks, owners, member_dropped = _member_windows(tokenizer, member, truncate, word_id)
            word_id += len(member.fragments)
            dropped += member_dropped
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
        warn_at_caller(truncation_message(dropped, total, chunk_capacity(tokenizer), len(windows),
                                          keep_hint=not fixed), PromptWarning)
    return CompelLayout(windows, dropped, total)


def truncation_message(dropped: int, total: int, limit: int, prompts: int, *, keep_hint: bool = True) -> str:
    """What :func:`compel_layout` warns of when truncation drops tokens.

    >>> message = truncation_message(25, 100, 75, 1)
    >>> message.startswith("syntax='compel' dropped 25 of the prompt's 100 tokens"), message[-49:]
    (True, 'pass truncate_long_prompts=False to keep them all')
    """
    each = " of each .and()/.blend() prompt" if prompts > 1 else ""
    hint = ("pass truncate_long_prompts=False to keep them all" if keep_hint
            else "the model's compel wrapper keeps no more (CompelForFlux truncates)")
    return (f"{TRUNCATION_WARNING}{dropped} of the prompt's {total} tokens: compel's "
            f"truncate_long_prompts=True (the default) keeps the first {limit}{each}; {hint}")


def compel_windows(tokenizer: Vocabulary, prompt: CompelPrompt, *, truncate: bool,
                   return_word_ids: bool, text: str) -> list[list[CompelToken]]:
    """:func:`compel_layout`'s windows."""
    return compel_layout(tokenizer, prompt, truncate=truncate, return_word_ids=return_word_ids, text=text).windows
