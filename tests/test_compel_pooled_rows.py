"""compel's pooled output costs one forward row, and only where the pooled output is used.

compel pools the raw prompt text's window (:func:`textenc.prompts.dialects.compel.tokens.pooled_window`),
which textenc encodes as one more row of the prompt's forward. SDXL's pooled output is G's
alone, so its L encoder is asked for none (``need_pooled=False``) and encodes no such row;
neither does any encoder when ``CLIP.encode_from_tokens`` is asked for cond only. The rows
are counted with forward hooks on the transformers; the numbers are checked against the
real compel's SDXL setup (the fixture of ``tests/test_compel_sdxl.py``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("compel")
pytest.importorskip("transformers")

from compel_prompts import LONG_SENTENCES  # noqa: E402
from test_compel_sdxl import COMPEL, compel_encode, max_error, one_compel_parser, sdxl  # noqa: E402,F401

#: down-weighted fragments (one masked forward each) and markup, so the raw text's window
#: differs from the parsed prompt's first window.
PROMPTS = ["a (cat)0.5 on a mat", "a red fox, (deep snow)0.7, (pine forest)0.4 at dawn",
           '("a red fox", "a blue bird").blend(0.7, 0.3)']


class RowCounter:
    """Rows (windows) of every forward of the hooked transformers, per encoder name."""

    def __init__(self, clip) -> None:
        model = clip.cond_stage_model
        self.rows: dict[str, list[int]] = {"l": [], "g": []}
        self.handles = [getattr(model, f"clip_{name}").transformer.register_forward_hook(
            self._hook(name), with_kwargs=True) for name in self.rows]

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            self.rows[name].append(kwargs["embeds"].shape[0])
        return hook

    def __enter__(self) -> "RowCounter":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def _counted(clip, prompt: str, **kwargs):
    tokens = clip.tokenize(prompt, syntax="compel", truncate_long_prompts=kwargs.pop("truncate", True))
    clip.encode_from_tokens(tokens, options=COMPEL, **kwargs)  # fills the empty-prompt caches
    with RowCounter(clip) as counter:
        out = clip.encode_from_tokens(tokens, options=COMPEL, **kwargs)
    return tokens, out, counter.rows


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sdxl_l_encodes_no_pooled_row_and_g_pools_as_compel(sdxl, one_compel_parser, prompt):
    tokens, (cond, pooled), rows = _counted(sdxl["clip"], prompt, return_pooled=True)
    # G: the prompt's windows plus the raw text's window, then the same masked rows as L.
    assert rows["g"][0] == len(tokens["g"]) + 1 and rows["l"][0] == len(tokens["l"])
    assert rows["g"][1:] == rows["l"][1:] and sum(rows["g"]) == sum(rows["l"]) + 1
    theirs = compel_encode(sdxl, one_compel_parser, prompt)
    max_error(cond, theirs[0], prompt)
    max_error(pooled, theirs[1], prompt + " (pooled)")


def test_long_prompt_l_rows_are_its_chunks(sdxl, one_compel_parser):
    """``truncate_long_prompts=False``: several chunks on each side, still one extra row on G only."""
    prompt = LONG_SENTENCES + " (blurry)0.5"
    tokens, (cond, pooled), rows = _counted(sdxl["clip"], prompt, return_pooled=True, truncate=False)
    assert len(tokens["l"]) >= 2
    assert rows["l"][0] == len(tokens["l"]) and rows["g"][0] == len(tokens["g"]) + 1
    theirs = compel_encode(sdxl, one_compel_parser, prompt, truncate=False)
    max_error(cond, theirs[0], prompt)
    max_error(pooled, theirs[1], prompt + " (pooled)")


def test_cond_only_encodes_no_pooled_row_on_either_encoder(sdxl, one_compel_parser):
    """``encode_from_tokens`` without ``return_pooled`` discards pooled: neither side pays for it."""
    prompt = PROMPTS[0]
    tokens, cond, rows = _counted(sdxl["clip"], prompt)
    assert isinstance(cond, torch.Tensor)
    assert rows["l"][0] == len(tokens["l"]) and rows["g"][0] == len(tokens["g"])
    max_error(cond, compel_encode(sdxl, one_compel_parser, prompt)[0], prompt)


@pytest.mark.parametrize("threads", [1, 2])
def test_need_pooled_false_leaves_cond_bit_equal(sdxl, threads):
    """The raw-text row was only ever appended: the other rows' cond does not change."""
    clip = sdxl["clip"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for prompt in PROMPTS:
            tokens = clip.tokenize(prompt, syntax="compel")["l"]
            encoder = clip.cond_stage_model.clip_l
            with_row = encoder.encode_token_weights(tokens, options=COMPEL)
            without = encoder.encode_token_weights(tokens, options=COMPEL, need_pooled=False)
            assert without[1] is None and with_row[1].shape == (1, encoder.config.projection_dim)
            assert torch.equal(with_row[0], without[0]), prompt
    finally:
        torch.set_num_threads(before)


def test_need_pooled_false_returns_none_for_pooled(sdxl, one_compel_parser):
    """On one encoder: cond as compel's (L ‖ G split at L's width), pooled None, one row fewer."""
    clip, prompt = sdxl["clip"], PROMPTS[1]
    tokens = clip.tokenize(prompt, syntax="compel")
    encoder = clip.cond_stage_model.clip_g
    theirs = compel_encode(sdxl, one_compel_parser, prompt)[0][..., clip.cond_stage_model.clip_l.config.hidden_size:]
    with RowCounter(clip) as counter:
        cond, pooled = encoder.encode_token_weights(tokens["g"], options=COMPEL, need_pooled=False)
    assert pooled is None and counter.rows["g"][0] == len(tokens["g"])
    max_error(cond, theirs, prompt)
