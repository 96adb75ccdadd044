"""``syntax="a1111"`` on SD3 (as AUTOMATIC1111's webui reads it) and Flux (as Forge reads it).

The facts, from AUTOMATIC1111/stable-diffusion-webui (v1.10) ``modules/models/sd3/sd3_cond.py``
(``Sd3ClipLG``, ``Sd3T5``, ``SD3Cond``), ``modules/sd_hijack_clip.py``
(``TextConditionalModel``) and ``modules/shared_options.py``, and from
lllyasviel/stable-diffusion-webui-forge ``backend/diffusion_engine/flux.py``,
``backend/text_processing/t5_engine.py`` and ``classic_engine.py``; this is an
independent implementation (docs/families.md states the rules):

SD3 (A1111)
    * One CLIP-L tokenizer reads the prompt with A1111's chunks (75 tokens, ``BREAK``, comma
      backtracking); L gets the ids padded with the end token, G the same ids with 0 after
      the first end token; both at the penultimate layer without the final norm. Textual
      inversions are refused (A1111's SD3 encoder gives zeros for them).
    * Each chunk is L beside G, zero-padded to T5's width, and *then* A1111's emphasis is
      applied to that joined tensor: one mean, over L and G together (and over every text
      of a prompt schedule, per chunk index), where SDXL has one per encoder.
    * pooled: L's unprojected ‖ G's projected pooled output of the first chunk.
    * T5 reads the same attention pieces (``BREAK`` dropped), each tokenized on its own,
      then ``</s>``; it is padded with 0 or cut to CLIP's token count (77 per chunk; in a
      schedule, the longest text's) and encoded unmasked. A1111 computes T5 multipliers but
      never applies them: T5 is unweighted. cond is CLIP's rows, then T5's.
    * A1111's ``sd3_enable_t5`` (default False) is "is T5 loaded" here: without T5, its
      rows are zeros, as A1111's with the setting off. L and G are required (A1111 always
      loads both).

Flux (Forge)
    * T5: the attention pieces, each tokenized on its own, ``</s>``, padded with 0 to at
      least 256; weighted by the emphasis setting with the mean over the whole sequence.
      ``BREAK`` is refused: Forge stacks the parts on the batch axis, which keeps only the
      first for one prompt and mixes up prompts of a schedule.
    * pooled: CLIP-L (last layer, A1111's chunks) first chunk's pooled output; L's cond is
      unused. Each text of a schedule is encoded on its own.

Emphasis: ``weight_mode`` ``a1111`` ("Original"), ``a1111_no_norm`` ("No norm"), ``none``
("Ignore"); ``disable_weights=True`` is the setting "None" (the prompt is plain text).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import PromptError
from ..prompts.dialects.a1111 import parse_attention
from ..prompts.dialects.a1111.attention import is_break
from ..prompts.report import InspectReport, TokenReport, UnitReport
from .encode import encode_windows
from .weighting import A1111Emphasis, get_weight_mode, token_weights

__all__ = ["SD3A1111Pair", "tokenize_sd3_a1111", "tokenize_flux_a1111", "is_sd3_a1111",
           "encode_sd3_a1111", "encode_sd3_a1111_schedule", "encode_each_schedule_text", "A1111_READINGS",
           "FamilyT5Part", "part_tokenizers"]

#: T5's end and pad ids (``Sd3T5``/``T5TextProcessingEngine``: ``id_end`` 1, ``id_pad`` 0).
_T5_END, _T5_PAD = 1, 0
#: A1111's chunk: 75 prompt tokens plus start and end.
_CHUNK_ROWS = 77


class SD3A1111Pair(tuple):
    """A T5 ``(token, weight[, word_id])`` of SD3's A1111 reading: its mark tells
    :class:`~textenc.text_encoders.sd3_clip.SD3ClipModel` to encode the prompt as A1111 does.
    The sequence is cut or padded to the prompt's CLIP rows; the first pair keeps the ids
    cut off in ``overflow``, which a schedule with more chunks gets back (A1111 fits T5 to
    the batch's CLIP rows)."""

    a1111_reading = "sd3"
    overflow: tuple[int, ...] = ()


def _t5_pieces(text: str, *, disable_weights: bool) -> list[list]:
    """A1111's attention pieces for T5; with emphasis "None" the whole prompt, unparsed."""
    return [[text, 1.0]] if disable_weights else parse_attention(text)


def _t5_pairs(t5_tokenizer: Any, pieces: list[list], weighted: bool) -> list[tuple]:
    """``(token, weight, word_id)`` of every non-break piece (tokenized on its own), then ``</s>``."""
    kept = [(index + 1, piece) for index, piece in enumerate(pieces) if not is_break(*piece)]
    token_lists = t5_tokenizer.encode_units([piece[0] for _, piece in kept])
    pairs = [(token, float(piece[1]) if weighted else 1.0, word_id)
             for (word_id, piece), tokens in zip(kept, token_lists) for token in tokens]
    return pairs + [(_T5_END, 1.0, 0)]


def _clip_windows(tokenizer: Any, text: str, return_word_ids: bool, kwargs: Mapping[str, Any]) -> list:
    return tokenizer.tokenize_with_weights(text, return_word_ids, syntax="a1111", **kwargs)


def _shape(pairs: list[tuple], return_word_ids: bool, make: Callable = tuple) -> list:
    return [make(pair if return_word_ids else pair[:2]) for pair in pairs]


def _g_windows(windows: list, end: int, pad: int) -> list:
    """``Sd3ClipLG``: G reads L's token ids (one CLIP-L tokenizer, A1111's ftfy clean-up, not
    open_clip's), with G's pad id after each window's first end token."""
    out = []
    for window in windows:
        cut = next(i for i, pair in enumerate(window) if pair[0] == end) + 1
        out.append(list(window[:cut]) + [(pad, *pair[1:]) for pair in window[cut:]])
    return out


def tokenize_sd3_a1111(tokenizer: Any, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict:
    """``{"g", "l": A1111 windows, "t5xxl": [T5 sequence of 77 per chunk]}`` of ``text`` (SD3Tokenizer).

    Raises:
        PromptError: a textual inversion (A1111 defines none for SD3: its ``Sd3ClipLG`` gives
            zeros for one), or what the a1111 dialect refuses.
    """
    kwargs.pop("syntax", None)
    windows = _clip_windows(tokenizer.clip_l, text, return_word_ids, kwargs)
    if any(not isinstance(pair[0], int) for window in windows for pair in window):
        raise PromptError("a textual inversion in an SD3 prompt with syntax='a1111': A1111 defines none for SD3 "
                          "(its SD3 text encoder gives zeros for one); remove it or use syntax='comfy'")
    out = {"g": _g_windows(windows, tokenizer.clip_l.end_token, tokenizer.clip_g.pad_token), "l": windows}
    pieces = _t5_pieces(text, disable_weights=bool(kwargs.get("disable_weights", False)))
    pairs = _t5_pairs(tokenizer.t5xxl, pieces, weighted=False)
    length = _CHUNK_ROWS * len(windows)  # Sd3T5.tokenize_line's target_token_count
    kept = pairs[:length] + [(_T5_PAD, 1.0, 0)] * (length - len(pairs))
    sequence = _shape(kept, return_word_ids, SD3A1111Pair)
    sequence[0].overflow = tuple(pair[0] for pair in pairs[length:])
    out["t5xxl"] = [sequence]
    return out


def tokenize_flux_a1111(tokenizer: Any, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict:
    """``{"l": A1111 windows, "t5xxl": [T5 sequence, weighted, padded to the minimum]}`` (FluxTokenizer).

    Raises:
        PromptError: ``BREAK`` (Forge's T5 engine gives it no defined meaning), or what the
            a1111 dialect refuses.
    """
    kwargs.pop("syntax", None)
    windows = _clip_windows(tokenizer.clip_l, text, return_word_ids, kwargs)
    disable = bool(kwargs.get("disable_weights", False))
    pieces = _t5_pieces(text, disable_weights=disable)
    if any(is_break(*piece) for piece in pieces):
        raise PromptError("BREAK in a Flux prompt with syntax='a1111': Forge's T5 engine stacks the parts on "
                          "the batch axis (one prompt keeps only the first part), so it has no defined meaning; "
                          "remove BREAK, or use syntax='comfy'")
    pairs = _t5_pairs(tokenizer.t5xxl, pieces, weighted=True)
    minimum = tokenizer.t5xxl.min_length or 0
    pairs += [(_T5_PAD, 1.0, 0)] * max(0, minimum - len(pairs))
    return {"l": windows, "t5xxl": [_shape(pairs, return_word_ids)]}


def is_sd3_a1111(tokens: Mapping[str, Any]) -> bool:
    """Whether ``tokens`` come from :func:`tokenize_sd3_a1111` (their T5 pairs carry its mark)."""
    sequences = tokens.get("t5xxl") or []
    return bool(sequences) and bool(sequences[0]) and \
        getattr(sequences[0][0], "a1111_reading", None) == "sd3"


def _emphasis(encoder: Any, options: Mapping[str, Any] | None) -> tuple[Any, A1111Emphasis]:
    opts = encoder.resolve_options(options)
    mode = get_weight_mode(opts.weight_mode)
    if not isinstance(mode, A1111Emphasis):
        raise PromptError(f"syntax='a1111' on SD3 encodes as A1111 does, with its emphasis: weight_mode "
                          f"'a1111', 'a1111_no_norm' or 'none', not {opts.weight_mode!r}")
    return opts, mode


def _empty_chunk(encoder: Any) -> list[tuple]:
    """A1111's ``empty_chunk``: start, then end tokens (the encoder's pad after the first end)."""
    special = encoder.special_tokens
    return [(special["start"], 1.0, 0), (special["end"], 1.0, 0)] + \
        [(special["pad"], 1.0, 0)] * (encoder.max_length - 2)


def _chunks(encoder: Any, per_text: Sequence[list], chunks: int) -> list[list]:
    """Every text's windows, padded with empty chunks to ``chunks``, flattened text by text."""
    return [window for windows in per_text
            for window in list(windows) + [_empty_chunk(encoder)] * (chunks - len(windows))]


def _clip_rows(model: Any, prompts: Sequence[Mapping[str, list]], options) -> tuple[torch.Tensor, torch.Tensor]:
    """``Sd3ClipLG`` over a batch: ``(L ‖ G emphasised together (B, 77·C, L+G), pooled (B, P_L+P_G))``."""
    chunks = max(len(p["l"]) for p in prompts)
    sides, pooled = [], []
    for role, encoder in (("l", model.clip_l), ("g", model.clip_g)):
        opts, mode = _emphasis(encoder, options)
        flat = _chunks(encoder, [p[role] for p in prompts], chunks)
        z, rows = encode_windows(encoder, [[pair[0] for pair in window] for window in flat], opts)[:2]
        sides.append(z.reshape(len(prompts), chunks, z.shape[1], z.shape[2]))
        pooled.append(rows.reshape(len(prompts), chunks, -1)[:, 0])
        if role == "l":
            weights = token_weights(flat, opts.normalization)[0]
    z = torch.cat(sides, dim=-1)  # (B, C, 77, L+G): one emphasis over both, as A1111's joined tensor
    z = mode.apply_over_texts(z, weights.reshape(len(prompts), chunks, -1).to(z.device))
    return z.reshape(len(prompts), chunks * z.shape[2], z.shape[3]), torch.cat(pooled, dim=-1)


def _t5_rows(model: Any, prompts: Sequence[Mapping[str, list]], length: int, options) -> torch.Tensor:
    """``Sd3T5``: each text's T5 ids cut or padded with 0 to ``length``, unweighted, unmasked."""
    if model.t5xxl is None:  # A1111's sd3_enable_t5 off: zeros
        return torch.zeros((len(prompts), length, model.width))
    ids = []
    for prompt in prompts:
        sequence = prompt["t5xxl"][0]
        tokens = ([pair[0] for pair in sequence] + list(getattr(sequence[0], "overflow", ())))[:length]
        ids.append(tokens + [_T5_PAD] * (length - len(tokens)))
    return encode_windows(model.t5xxl, ids, model.t5xxl.resolve_options(options))[0]


def encode_sd3_a1111(model: Any, prompts: Sequence[Mapping[str, list]],
                     options: Mapping[str, Any] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(cond [1, 2·77·C, width], pooled [1, P])`` of each prompt, encoded as one A1111 batch
    (``SD3Cond.forward``); ``model`` is an ``SD3ClipModel``. Without ``weight_mode`` in
    ``options``: ``a1111`` (A1111's default emphasis, "Original").

    Raises:
        PromptError: L or G not loaded, or a weight mode that is not A1111's.
    """
    options = {"weight_mode": "a1111", **(options or {})}  # these tokens carry their reading
    if model.clip_l is None or model.clip_g is None:
        raise PromptError("syntax='a1111' on SD3 needs CLIP-L and CLIP-G (A1111 always loads both); load them, "
                          "or use syntax='comfy'")
    clip, pooled = _clip_rows(model, prompts, options)
    if clip.shape[-1] > model.width:
        raise PromptError(f"SD3: CLIP features of width {clip.shape[-1]} do not fit T5's width {model.width}")
    clip = torch.nn.functional.pad(clip, (0, model.width - clip.shape[-1]))
    t5 = _t5_rows(model, prompts, clip.shape[1], options).to(clip.device, clip.dtype)
    cond = torch.cat([clip, t5], dim=-2)
    return [(cond[i:i + 1], pooled[i:i + 1]) for i in range(len(prompts))]


def encode_sd3_a1111_schedule(model: Any, tokenize: Callable[[str], dict], texts: Sequence[str],
                              options: Mapping[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The texts of one SD3 prompt schedule, as A1111 encodes them: one batch."""
    unique = list(dict.fromkeys(texts))
    encoded = dict(zip(unique, encode_sd3_a1111(model, [tokenize(text) for text in unique], options)))
    return [encoded[text] for text in texts]


def encode_each_schedule_text(model: Any, tokenize: Callable[[str], dict], texts: Sequence[str],
                              options: Mapping[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Flux (Forge): each text of a schedule on its own (T5 per line; L's pooled of its first chunk)."""
    return [tuple(model.encode_token_weights(tokenize(text), options=options)[:2]) for text in texts]


#: family tokenizer name → its A1111 reading (see the family modules' ``syntax_readings``).
A1111_READINGS = {"sd3": tokenize_sd3_a1111, "flux": tokenize_flux_a1111}


class FamilyT5Part:
    """A family's T5 part as ``textenc inspect`` reads it: a syntax the family tokenizer reads as
    a whole (``syntax_readings``) is reported from that reading; others go to the T5 tokenizer."""

    def __init__(self, family_tokenizer: Any, role: str) -> None:
        self.family_tokenizer, self.role = family_tokenizer, role
        self.tokenizer = family_tokenizer.tokenizers[role]
        self.min_length = getattr(self.tokenizer, "min_length", None)

    def inspect(self, text: str, syntax: str | None = None, **kwargs: Any) -> InspectReport:
        """The T5 tokens of ``text`` (word id: the attention piece, 0 for ``</s>`` and padding).

        Raises:
            PromptError: what the reading refuses.
        """
        if syntax not in self.family_tokenizer.syntax_readings:
            return self.tokenizer.inspect(text, syntax=syntax, **kwargs)
        tokens = self.family_tokenizer.tokenize_with_weights(text, True, syntax=syntax, **kwargs)[self.role]
        window = [TokenReport(int(t), self.tokenizer.token_text(t), float(w), int(i)) for t, w, i in tokens[0]]
        pieces = _t5_pieces(text, disable_weights=bool(kwargs.get("disable_weights", False)))
        units = []
        for word_id, piece in enumerate(pieces, start=1):
            if not is_break(*piece):
                count = sum(1 for token in window if token.word_id == word_id)
                units.append(UnitReport(word_id, "text", piece[0], float(piece[1]), -1, -1, count))
        return InspectReport([window], units)


def part_tokenizers(family_tokenizer: Any) -> dict[str, Any]:
    """``family_tokenizer.tokenizers`` with the T5 part (``t5xxl``) as a :class:`FamilyT5Part`
    where the family reads some syntax as a whole (SD3, Flux)."""
    parts = dict(family_tokenizer.tokenizers)
    if getattr(family_tokenizer, "syntax_readings", None) and "t5xxl" in parts:
        parts["t5xxl"] = FamilyT5Part(family_tokenizer, "t5xxl")
    return parts
