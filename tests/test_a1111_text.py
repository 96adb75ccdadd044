"""syntax="a1111" tokenizes unusual text as A1111's own tokenizers do (ftfy clean-up).

The expectations in ``a1111_text_expected.json`` come from A1111's tokenizers themselves
(transformers 4.30.2's slow ``CLIPTokenizer`` and open_clip 2.20.0's ``SimpleTokenizer``,
with ftfy), run in an environment of their own by ``tests/a1111_text_oracle.py``, never
from textenc. ``syntax="comfy"`` is checked against transformers' current
``CLIPTokenizer`` (ComfyUI's tokenizer, which never calls ftfy) on the same texts.
"""

from __future__ import annotations

import json
import os
import string

import pytest
from hypothesis import given, settings, strategies as st

from textenc.prompts.a1111_text import clean_text, encode_a1111, split_words
from textenc.prompts.tokenizer import DEFAULT_VOCAB, SDTokenizer
from textenc.text_encoders.sd1_clip import SD1Tokenizer
from textenc.text_encoders.sd2_clip import SD2Tokenizer
from textenc.text_encoders.sdxl_clip import SDXLTokenizer

with open(os.path.join(os.path.dirname(__file__), "a1111_text_expected.json"), encoding="utf-8") as _handle:
    EXPECTED = json.load(_handle)
CASES = [case for case in EXPECTED["cases"]
         if not isinstance(case["clip_l"], dict) and not isinstance(case["open_clip"], dict)]
# Texts A1111's attention parser leaves whole (no brackets, colons, backslashes or BREAK),
# so the whole prompt is one piece and its window holds exactly the tokenizer's ids.
ONE_PIECE = [case for case in CASES
             if not set(case["text"]) & set("()[]:\\") and "BREAK" not in case["text"]]


def _ids(case: dict) -> str:
    return ascii(case["text"])[:40]


@pytest.fixture(scope="module")
def clip_l() -> SDTokenizer:
    return SDTokenizer()


@pytest.fixture(scope="module")
def open_clip() -> SDTokenizer:
    return SDTokenizer(pad_with_end=False)  # how SD2 and SDXL-G are built: A1111 reads them with open_clip


def test_the_expectations_come_from_a1111s_tokenizers():
    assert EXPECTED["generator"] == "tests/a1111_text_oracle.py"
    assert EXPECTED["versions"]["transformers"] == "4.30.2"
    assert EXPECTED["versions"]["open-clip-torch"] == "2.20.0"
    assert len(CASES) == len(EXPECTED["cases"]) >= 340
    assert len(ONE_PIECE) >= 300


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_pieces_tokenize_as_a1111(case, clip_l, open_clip):
    assert encode_a1111(clip_l, [case["text"]]) == [case["clip_l"]]
    assert encode_a1111(open_clip, [case["text"]]) == [case["open_clip"]]


def test_many_pieces_at_once_equal_one_by_one(clip_l, open_clip):
    texts = [case["text"] for case in CASES]
    assert encode_a1111(clip_l, texts) == [case["clip_l"] for case in CASES]
    assert encode_a1111(open_clip, texts) == [case["open_clip"] for case in CASES]


def _prompt_tokens(window: list[tuple], count: int) -> list[int]:
    return [token for token, *_ in window[1:1 + count]]


@pytest.fixture(scope="module")
def models():
    return SD1Tokenizer(), SD2Tokenizer(), SDXLTokenizer()


@pytest.mark.parametrize("case", ONE_PIECE, ids=_ids)
def test_syntax_a1111_windows_hold_a1111s_ids(case, models):
    """SD1 and SDXL-L as transformers' tokenizer, SD2 and SDXL-G as open_clip's (A1111's choice)."""
    sd1, sd2, sdxl = (model.tokenize_with_weights(case["text"], syntax="a1111") for model in models)
    for windows, expected in ((sd1["l"], case["clip_l"]), (sdxl["l"], case["clip_l"]),
                              (sd2["h"], case["open_clip"]), (sdxl["g"], case["open_clip"])):
        (window,) = windows
        assert _prompt_tokens(window, len(expected)) == expected
        assert window[1 + len(expected)][0] == 49407  # the end token follows


_BY_TEXT = {case["text"]: case for case in CASES}
# EXPECTED["prompts"] cut into chunks of (piece, weight) by A1111's rules (written out by
# hand: brackets multiply, BREAK and the white space around it close a chunk).
PROMPT_CHUNKS = [
    [[("\u201ccat\u201d", 1.2), (", \uff46\uff55\uff4c\uff4c body, ", 1.0), ("\u732b", 1 / 1.1)]],
    [[("\u2018cat\u2019", 1.1), (" \ufb01sh &amp; chips", 1.0)]],
    [[("\u201ccat\u201d", 1.0)], [("\u00c3\u00a9", 1.0)], [("", 1.0), ("\U0001f431", 1.21), (", \u00a0soft light", 1.0)]],
]


@pytest.mark.parametrize("prompt, chunks", list(zip(EXPECTED["prompts"], PROMPT_CHUNKS)))
def test_prompts_with_syntax_tokenize_their_pieces_as_a1111(prompt, chunks, models):
    sd1, sd2, _ = models
    for windows, key in ((sd1.tokenize_with_weights(prompt, syntax="a1111")["l"], "clip_l"),
                         (sd2.tokenize_with_weights(prompt, syntax="a1111")["h"], "open_clip")):
        assert len(windows) == len(chunks)
        for window, chunk in zip(windows, chunks):
            tokens = [t for piece, _ in chunk for t in _BY_TEXT[piece][key]]
            weights = [w for piece, w in chunk for _ in _BY_TEXT[piece][key]]
            assert _prompt_tokens(window, len(tokens)) == tokens
            assert [w for _, w, *_ in window[1:1 + len(tokens)]] == pytest.approx(weights)


def test_textual_inversion_names_are_cleaned_like_the_prompt(tmp_path):
    """A1111 registers an embedding by its name's token ids, from the same tokenizer."""
    from safetensors.torch import save_file
    import torch

    save_file({"emb_params": torch.ones(2, 768)}, str(tmp_path / "\uff43\uff41\uff54.safetensors"))  # full-width
    tokenizer = SDTokenizer(embedding_directory=str(tmp_path))
    (window,) = tokenizer.tokenize_with_weights("a CAT", syntax="a1111")
    assert window[1][0] == 320 and all(not isinstance(token, int) for token, *_ in window[2:4])


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.printable.replace("&", "").replace("<", "").replace("\r", "")
               .replace("\x0b", "").replace("\x0c", ""), max_size=40))
def test_plain_ascii_needs_no_clean_up(text):
    """The fast path's premise, checked against ftfy itself: plain ASCII changes only in
    white space and case, which the Rust backend normalises the same way."""
    assert clean_text(text) == " ".join(text.split()).lower()
    assert clean_text(text, open_clip=True) == " ".join(text.split()).lower()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_any_text_tokenizes_like_its_words(text):
    tokenizer = _CLIP_L
    ids = encode_a1111(tokenizer, [text])[0]
    assert ids == [t for word in split_words(text) for t in tokenizer.encode_units([word])[0]]


_CLIP_L = SDTokenizer()


@pytest.fixture(scope="module")
def hf_current():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)


@pytest.mark.parametrize("case", ONE_PIECE[::3], ids=_ids)
def test_syntax_comfy_keeps_comfyuis_tokenizer(case, hf_current, clip_l):
    """ComfyUI tokenizes with transformers' current CLIPTokenizer, which runs no ftfy."""
    text = case["text"]
    if "embedding:" in text or "\\" in text:
        pytest.skip("not a plain comfy prompt")
    expected = hf_current([text], add_special_tokens=False)["input_ids"][0]
    (window,) = clip_l.tokenize_with_weights(text)
    assert _prompt_tokens(window, len(expected)) == expected


def test_surrogates(clip_l):
    """ftfy joins a surrogate pair, as in A1111; a lone surrogate (A1111 raises
    UnicodeEncodeError) becomes U+FFFD instead of failing."""
    assert encode_a1111(clip_l, ["\ud83d\udc31"]) == [_BY_TEXT["\U0001f431"]["clip_l"]]
    assert encode_a1111(clip_l, ["a\ud800b"]) == encode_a1111(clip_l, ["a\ufffdb"])
