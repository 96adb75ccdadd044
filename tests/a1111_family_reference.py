"""AUTOMATIC1111's SD3 and Forge's Flux text conditioning restated over transformers' models:
the oracle of ``tests/test_a1111_families.py``. FOR COMPARISON ONLY; nothing of textenc is used.

Written from AUTOMATIC1111/stable-diffusion-webui ``modules/models/sd3/sd3_cond.py``
(``Sd3ClipLG.encode_with_transformers``, ``Sd3T5.tokenize_line``/``forward``, ``SD3Cond.forward``),
``modules/sd_hijack_clip.py`` (``TextConditionalModel.forward``/``process_tokens``) and
``modules/sd_emphasis.py``; and from lllyasviel/stable-diffusion-webui-forge
``backend/diffusion_engine/flux.py`` (``get_learned_conditioning``),
``backend/text_processing/t5_engine.py`` (``tokenize_line``, ``__call__``, ``process_tokens``),
``classic_engine.py`` (``encode_with_transformers``: ``pooler_output``) and ``emphasis.py``.

The CLIP chunking is :class:`a1111_reference.OracleClip`'s (A1111's 75-token chunks), the
attention pieces :func:`a1111_reference.oracle_attention`'s; T5 pieces are tokenized by
transformers' ``T5TokenizerFast`` (``add_special_tokens=False``, as both projects call it).

SD3: per chunk index, L (end-padded) and G (0 after the first end) at ``hidden_states[-2]``,
joined on the feature axis, zero-padded to T5's width, then one emphasis over that joined
batch; pooled L ``pooler_output`` ‖ G ``text_embeds`` of chunk 0. T5: non-break pieces' ids,
``</s>``, then padded with 0 / cut to CLIP's row count; unweighted, unmasked (zeros without T5).

Flux: T5 ids of the pieces with their weights, ``</s>``, 0 up to 256; emphasis over the whole
sequence; pooled CLIP-L ``pooler_output`` (last layer) of chunk 0.
"""

from __future__ import annotations

import torch

from a1111_reference import BREAK_MARK, OracleClip, oracle_attention


def emphasize(z: torch.Tensor, weights: torch.Tensor, emphasis: str) -> torch.Tensor:
    """``sd_emphasis``: "Original" (z·w, mean restored over the whole tensor), "No norm", "Ignore"/"None"."""
    if emphasis in ("Ignore", "None"):
        return z
    scaled = z * weights.to(z.dtype).unsqueeze(-1)
    if emphasis == "No norm":
        return scaled
    return scaled * (z.mean() / scaled.mean())


def pieces(prompt: str, emphasis: str) -> list:
    """The attention pieces; with emphasis "None" the prompt as one literal piece."""
    return [[prompt, 1.0]] if emphasis == "None" else oracle_attention(prompt)


class SD3Reference:
    """``SD3Cond.forward`` over a batch of texts."""

    def __init__(self, clip_tokenizer, t5_tokenizer, clip_l, clip_g, t5=None, *, width: int,
                 emphasis: str = "Original"):
        self.l = OracleClip(clip_tokenizer, clip_l)
        self.g = OracleClip(clip_tokenizer, clip_g, pad_id=0)
        self.t5_tokenizer, self.clip_l, self.clip_g, self.t5 = t5_tokenizer, clip_l, clip_g, t5
        self.width, self.emphasis = width, emphasis

    def t5_ids(self, prompt: str, length: int) -> list[int]:
        ids = []
        for text, weight in pieces(prompt, self.emphasis):
            if (text, weight) != BREAK_MARK:
                ids += self.t5_tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.append(1)
        return ids[:length] + [0] * (length - len(ids))

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        per_text = [self.l.chunks(text) for text in texts]
        blank = self.l.chunks("")[0]
        parts, pooled = [], None
        for index in range(max(len(c) for c in per_text)):
            row = [c[index] if index < len(c) else blank for c in per_text]
            ids_l = torch.tensor([self.l.window_ids(c) for c in row])
            ids_g = torch.tensor([self.g.window_ids(c) for c in row])
            out_l = self.clip_l(input_ids=ids_l, output_hidden_states=True)
            out_g = self.clip_g(input_ids=ids_g, output_hidden_states=True)
            z = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
            z = torch.nn.functional.pad(z, (0, self.width - z.shape[-1]))
            parts.append(emphasize(z, torch.tensor([c.weights for c in row]), self.emphasis))
            if index == 0:
                pooled = torch.cat([self.clip_l.text_model(input_ids=ids_l).pooler_output, out_g.text_embeds], -1)
        clip = torch.cat(parts, dim=1)
        length = clip.shape[1]
        if self.t5 is None:
            t5 = torch.zeros(len(texts), length, self.width)
        else:
            t5 = self.t5(input_ids=torch.tensor([self.t5_ids(t, length) for t in texts])).last_hidden_state
        return torch.cat([clip, t5], dim=1), pooled


class FluxReference:
    """Forge's ``Flux.get_learned_conditioning`` for one text (no BREAK)."""

    def __init__(self, clip_tokenizer, t5_tokenizer, clip_l, t5, *, emphasis: str = "Original",
                 min_length: int = 256):
        self.l = OracleClip(clip_tokenizer, clip_l)
        self.t5_tokenizer, self.clip_l, self.t5 = t5_tokenizer, clip_l, t5
        self.emphasis, self.min_length = emphasis, min_length

    def t5_pairs(self, prompt: str) -> list[tuple[int, float]]:
        pairs = []
        for text, weight in pieces(prompt, self.emphasis):
            assert (text, weight) != BREAK_MARK
            pairs += [(t, weight) for t in self.t5_tokenizer(text, add_special_tokens=False)["input_ids"]]
        pairs.append((1, 1.0))
        return pairs + [(0, 1.0)] * max(0, self.min_length - len(pairs))

    @torch.no_grad()
    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = self.t5_pairs(prompt)
        z = self.t5(input_ids=torch.tensor([[t for t, _ in pairs]])).last_hidden_state
        cond = emphasize(z, torch.tensor([[w for _, w in pairs]]), self.emphasis)
        first = self.l.chunks(prompt)[0]
        pooled = self.clip_l.text_model(input_ids=torch.tensor([self.l.window_ids(first)])).pooler_output
        return cond, pooled
