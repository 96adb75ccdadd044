"""ComfyUI's SD3, Flux and Wan text conditioning restated over transformers' models: the oracle
of ``tests/test_families.py``. FOR COMPARISON ONLY; nothing of textenc is used here.

Written from ComfyUI's ``comfy/text_encoders/sd3_clip.py`` (``SD3Tokenizer``, ``SD3ClipModel``),
``flux.py`` (``FluxTokenizer``, ``FluxClipModel``), ``wan.py`` (``WanT5Tokenizer``,
``WanT5Model``) and ``comfy/sd1_clip.py`` (``SDTokenizer.tokenize_with_weights`` for T5's
settings, ``ClipTokenWeightEncoder.encode_token_weights``, ``SDClipModel.forward``):

* tokens: CLIP parts by :class:`comfy_reference.ComfyTokenizer` (77-token windows); a T5 part
  is each weighted segment tokenized on its own without its ``</s>``, then ``</s>``, then
  ``<pad>`` (0) up to the family's minimum (SD3 77, Flux 256, Wan 512);
* encode: every window, plus the empty prompt of the same length when any weight is not 1,
  in one batch; a token of weight ``w != 1`` becomes ``(z - z_empty) * w + z_empty``;
  pooled is the first window's;
* SD3: L and G at hidden layer -2 without the final norm, cut to the shorter, side by side,
  zero-padded to T5's width, then T5 (unmasked) after them on the token axis; pooled
  L's unprojected ‖ G's projected; a missing CLIP part is zeros (its width 768 / 1280);
* Flux: T5 (unmasked) is the cond; pooled CLIP-L's unprojected pooled (last layer, normed);
* Wan: UMT5 masked (1 up to and including the first ``</s>``), rows after ``</s>`` zeroed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from comfy_reference import ComfyTokenizer, escape_important, token_weights, unescape_important

VOCAB = Path(__file__).resolve().parents[1] / "textenc" / "vocab"


def clip_tokenizer(*, pad_with_end: bool) -> ComfyTokenizer:
    """ComfyUI's CLIP tokenizer rules over transformers' ``CLIPTokenizer`` (L pads with the end
    token, G with 0)."""
    import transformers
    hf = transformers.CLIPTokenizer(str(VOCAB / "vocab.json"), str(VOCAB / "merges.txt"))
    return ComfyTokenizer(hf, pad_with_end=pad_with_end)


def t5_tokens(text: str, encode, min_length: int) -> list[list[tuple[int, float]]]:
    """ComfyUI's T5 tokens of ``text``: ``encode(piece)`` gives the piece's ids ending in ``</s>``."""
    tokens: list[tuple[int, float]] = []
    for segment, weight in token_weights(escape_important(text), 1.0):
        parts = re.split(" embedding:|\nembedding:", unescape_important(segment))
        for piece in [p for p in [parts[0]] + ["embedding:" + p for p in parts[1:]] if p]:
            tokens += [(t, weight) for t in encode(piece)[:-1]]
    tokens.append((1, 1.0))
    return [tokens + [(0, 1.0)] * max(0, min_length - len(tokens))]


def hf_t5_encode():
    import transformers
    from textenc.text_encoders.t5 import T5_VOCAB  # the bundled tokenizer file, read by transformers
    hf = transformers.T5TokenizerFast(tokenizer_file=f"{T5_VOCAB}/tokenizer.json")
    return lambda text: hf(text)["input_ids"]


def _weighted(windows: list, forward, empty_tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``ClipTokenWeightEncoder.encode_token_weights``: ``forward(ids [B, T]) -> (z, pooled)``."""
    ids = [[t for t, *_ in window] for window in windows]
    weighted = any(w != 1.0 for window in windows for _, w, *_ in window)
    length = max(len(window) for window in ids)
    batch = ids + [empty_tokens(length)] if weighted else ids
    with torch.no_grad():
        z, pooled = forward(torch.tensor(batch))
    out = []
    for k, window in enumerate(windows):
        zk = z[k].clone()
        if weighted:
            for j, (_, w, *_) in enumerate(window):
                if w != 1.0:
                    zk[j] = (zk[j] - z[-1][j]) * w + z[-1][j]
        out.append(zk)
    return torch.cat(out).unsqueeze(0), None if pooled is None else pooled[0:1]


def clip_part(model, windows: list, *, pad: int, layer: int | None, projected: bool):
    """One CLIP part: ``layer`` None = last layer (final norm), else HF ``hidden_states[layer]``
    (ComfyUI's hidden layer without the final norm); pooled projected or not."""
    def forward(ids):
        out = model(input_ids=ids, output_hidden_states=True)
        z = out.last_hidden_state if layer is None else out.hidden_states[layer]
        pooled = out.text_embeds if projected else model.text_model(input_ids=ids).pooler_output
        return z, pooled
    return _weighted(windows, forward, lambda n: [49406, 49407] + [pad] * (n - 2))


def end_mask(ids: torch.Tensor) -> torch.Tensor:
    """1 up to and including the first ``</s>`` (1), 0 after."""
    seen = (ids == 1).long().cumsum(-1)
    return ((seen == 0) | ((seen == 1) & (ids == 1))).long()


def t5_part(model, sequence: list, *, masked: bool, layer: int | None = None) -> torch.Tensor:
    """One T5 part; ``layer`` (ComfyUI's hidden layer) is HF's ``hidden_states[layer]`` (the
    output of block ``n + layer``) through the final layer norm, as ComfyUI's T5 applies it."""
    def forward(ids):
        mask = end_mask(ids) if masked else None
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        z = out.last_hidden_state if layer is None else model.encoder.final_layer_norm(out.hidden_states[layer])
        return (z * mask.unsqueeze(-1) if masked else z), None
    return _weighted(sequence, forward, lambda n: [1] + [0] * (n - 1))[0]


def sd3(tokens: dict, *, clip_l=None, clip_g=None, t5=None, width: int = 4096):
    """ComfyUI's ``SD3ClipModel.encode_token_weights`` → ``(cond, pooled)``."""
    lg, l_pooled, g_pooled = None, torch.zeros(1, 768), torch.zeros(1, 1280)
    if clip_l is not None:
        lg, l_pooled = clip_part(clip_l, tokens["l"], pad=49407, layer=-2, projected=False)
    if clip_g is not None:
        g_out, g_pooled = clip_part(clip_g, tokens["g"], pad=0, layer=-2, projected=True)
        if lg is not None:
            cut = min(lg.shape[1], g_out.shape[1])
            lg = torch.cat([lg[:, :cut], g_out[:, :cut]], dim=-1)
        else:
            lg = torch.nn.functional.pad(g_out, (768, 0))
    out = None if lg is None else torch.nn.functional.pad(lg, (0, width - lg.shape[-1]))
    if t5 is not None:
        t5_out = t5_part(t5, tokens["t5xxl"], masked=False)
        out = t5_out if out is None else torch.cat([out, t5_out], dim=-2)
    if out is None:
        out = torch.zeros(1, 77, 4096)
    return out, torch.cat([l_pooled, g_pooled], dim=-1)


def flux(tokens: dict, *, clip_l, t5):
    """ComfyUI's ``FluxClipModel.encode_token_weights`` → ``(T5 cond, L pooled)``."""
    return t5_part(t5, tokens["t5xxl"], masked=False), \
        clip_part(clip_l, tokens["l"], pad=49407, layer=None, projected=False)[1]


def wan(tokens: dict, *, umt5) -> torch.Tensor:
    """ComfyUI's ``WanT5Model``: UMT5 masked, rows after ``</s>`` zeroed; no pooled."""
    return t5_part(umt5, tokens["umt5xxl"], masked=True)
