"""T5 and UMT5 tokenizers: ids against transformers' ``T5TokenizerFast`` on the bundled file and
against ``sentencepiece`` on a tiny model trained here, with ComfyUI's rules on top.

ComfyUI's rules (``comfy/sd1_clip.py`` ``SDTokenizer`` with ``T5XXLTokenizer``'s /
``UMT5XXlTokenizer``'s settings, read from its code): ``\\(`` and ``\\)`` are literal
parentheses; each weighted segment is split before `` embedding:`` / ``\\nembedding:``
and each piece is tokenized on its own with its trailing ``</s>`` dropped; then one
``</s>`` (1) ends the sequence, which is padded with 0 to ``min_length``; no start token,
no windows. The reference below applies those rules to hand-written segments.
"""

from __future__ import annotations

import io
import re
import warnings

import pytest
import torch

from textenc.errors import CheckpointError, EmbeddingWarning
from textenc.prompts.spiece import SentencePieceTokenizer
from textenc.text_encoders.t5 import T5_VOCAB, T5XXLTokenizer, UMT5XXlTokenizer

transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

#: Unweighted edge cases: the whole prompt is one segment (after escapes).
CORPUS = [
    "", " ", "a photo of a cat", "a  b", "a   b  ", " leading", "trailing ", "tab\tx", "new\nline", "x\n\ny",
    "café naïve Ångström", "日本語のテキスト", "😀 emoji 🎉", "12345 3.14 1,000,000 007", "x\u200by", "A\u00a0B",
    "ｆｕｌｌｗｉｄｔｈ", "ﬁ ligature", "e\u0301", "\n", "   ", "</s>", "a </s> b", "a</s>b", "<pad> <unk>",
    "<extra_id_0> x", "back\\slash \\\\ two", "\\(escaped\\) parens", "a \\(b:1.5\\)", "UPPER lower MiXeD",
    "emoji👍🏽skin", "Ελληνικά русский עברית العربية", "tab\t\ttabs", "end.", "q: a? b! c;",
]
#: Weighted prompts and their segments, by ComfyUI's token_weights rules.
WEIGHTED = {
    "a (cat:1.2) sat": [("a ", 1.0), ("cat", 1.2), (" sat", 1.0)],
    "((big dog))": [("big dog", 1.1 * 1.1)],
    "(a (b:1.5):1.2) c": [("a ", 1.2), ("b", 1.5), (" c", 1.0)],
    "[x] (y:0.5)": [("[x] ", 1.0), ("y", 0.5)],
    "(</s>:1.3) after": [("</s>", 1.3), (" after", 1.0)],
    "(日本:0.8)語": [("日本", 0.8), ("語", 1.0)],
    "(\\(lit\\):1.1)": [("(lit)", 1.1)],
}


def comfy_reference(segments, encode, min_length: int) -> list[tuple[int, float]]:
    """ComfyUI's T5 token list for ``segments`` [(text, weight)]; ``encode(text)`` gives ids with ``</s>``."""
    tokens = []
    for text, weight in segments:
        parts = re.split(" embedding:|\nembedding:", text)
        pieces = [p for p in [parts[0]] + ["embedding:" + p for p in parts[1:]] if p]
        for piece in pieces:
            tokens += [(t, weight) for t in encode(piece)[:-1]]
    tokens.append((1, 1.0))
    return tokens + [(0, 1.0)] * max(0, min_length - len(tokens))


@pytest.fixture(scope="module")
def hf_t5():
    return transformers.T5TokenizerFast(tokenizer_file=f"{T5_VOCAB}/tokenizer.json")


@pytest.fixture(scope="module")
def t5():
    return T5XXLTokenizer(min_length=16)


def unescape(text: str) -> str:
    return text.replace("\\(", "(").replace("\\)", ")")


def test_bundled_file_ids_equal_t5_tokenizer_fast(hf_t5):
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(f"{T5_VOCAB}/tokenizer.json")
    texts = CORPUS + [text for segments in WEIGHTED.values() for text, _ in segments]
    assert [e.ids for e in backend.encode_batch(texts)] == [hf_t5(t)["input_ids"] for t in texts]
    assert hf_t5("a photo of a cat")["input_ids"] == [3, 9, 1202, 13, 3, 9, 1712, 1]


@pytest.mark.parametrize("text", CORPUS)
def test_unweighted_prompt_ids(text, t5, hf_t5):
    got = t5.tokenize_with_weights(text)
    assert len(got) == 1  # one sequence, never 77-token windows
    assert got[0] == comfy_reference([(unescape(text), 1.0)], lambda s: hf_t5(s)["input_ids"], 16)


@pytest.mark.parametrize("text", list(WEIGHTED))
def test_weighted_prompt_ids_and_weights(text, t5, hf_t5):
    want = comfy_reference(WEIGHTED[text], lambda s: hf_t5(s)["input_ids"], 16)
    got = t5.tokenize_with_weights(text)[0]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], abs=1e-12)


def test_embedding_split_without_directory(t5, hf_t5):
    # No embedding directory: the text stays text, but is split before "embedding:" as ComfyUI does.
    text = "a embedding:foo b"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbeddingWarning)
        got = t5.tokenize_with_weights(text)[0]
    assert got == comfy_reference([(text, 1.0)], lambda s: hf_t5(s)["input_ids"], 16)


def test_empty_prompt_and_lengths(hf_t5):
    assert T5XXLTokenizer(min_length=5).tokenize_with_weights("") == [[(1, 1.0), (0, 1.0), (0, 1.0), (0, 1.0),
                                                                       (0, 1.0)]]
    long = "word " * 300  # far past 77: one sequence, not windows
    tokens = T5XXLTokenizer().tokenize_with_weights(long)
    assert len(tokens) == 1 and len(tokens[0]) == len(hf_t5(long)["input_ids"])
    # The family's minimum, and ComfyUI's per-call and tokenizer_data overrides.
    assert len(T5XXLTokenizer(min_length=256).tokenize_with_weights("cat")[0]) == 256
    assert len(T5XXLTokenizer().tokenize_with_weights("cat", tokenizer_options={"t5xxl_min_length": 3})[0]) == 3
    assert len(T5XXLTokenizer(tokenizer_data={"t5xxl_min_length": 4}).tokenize_with_weights("cat")[0]) == 4
    padded = T5XXLTokenizer(min_length=1).tokenize_with_weights(
        "cat", tokenizer_options={"t5xxl_min_padding": 2})[0]
    assert [t for t, _ in padded] == [1712, 1, 0, 0]


def test_word_ids(t5):
    got = t5.tokenize_with_weights("a (cat:1.2)", return_word_ids=True)[0]
    assert got[:4] == [(3, 1.0, 1), (9, 1.0, 1), (1712, 1.2, 2), (1, 1.0, 0)]


# ---- UMT5: SentencePiece from the checkpoint --------------------------------------------

TRAINING_TEXT = [
    "a photo of a cat sitting on a mat", "the quick brown fox jumps over the lazy dog",
    "a painting of a mountain at sunset, highly detailed", "portrait of a woman with red hair",
    "日本語のテキストと漢字", "café naïve résumé", "numbers 123 456 7890", "emoji 😀 and symbols #@!",
] * 20


@pytest.fixture(scope="module")
def spiece_bytes() -> bytes:
    """A tiny Unigram SentencePiece model with UMT5's special ids (pad 0, </s> 1, unk 2, no <s>)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT), model_writer=model, vocab_size=400, model_type="unigram", hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True, character_coverage=1.0,
        minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="module")
def spiece_tensor(spiece_bytes) -> torch.Tensor:
    """The model as Wan files store it: a 1-D uint8 tensor named spiece_model."""
    return torch.tensor(list(spiece_bytes), dtype=torch.uint8)


@pytest.fixture(scope="module")
def umt5(spiece_tensor):
    return UMT5XXlTokenizer(tokenizer_data={"spiece_model": spiece_tensor}, min_length=16)


@pytest.mark.parametrize("text", CORPUS)
def test_umt5_ids_equal_sentencepiece(text, umt5, spiece_bytes):
    processor = sentencepiece.SentencePieceProcessor(model_proto=spiece_bytes)
    want = comfy_reference([(unescape(text), 1.0)], lambda s: processor.encode(s, add_eos=True), 16)
    assert umt5.tokenize_with_weights(text) == [want]


@pytest.mark.parametrize("text", list(WEIGHTED))
def test_umt5_weighted(text, umt5, spiece_bytes):
    processor = sentencepiece.SentencePieceProcessor(model_proto=spiece_bytes)
    want = comfy_reference(WEIGHTED[text], lambda s: processor.encode(s, add_eos=True), 16)
    got = umt5.tokenize_with_weights(text)[0]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], abs=1e-12)


def test_umt5_defaults_and_round_trip(spiece_tensor, spiece_bytes):
    tokenizer = UMT5XXlTokenizer(tokenizer_data={"spiece_model": spiece_tensor})
    assert tokenizer.tokenize_with_weights("")[0] == [(1, 1.0)] + [(0, 1.0)] * 511  # Wan's 512
    assert torch.equal(tokenizer.state_dict()["spiece_model"], spiece_tensor)
    assert UMT5XXlTokenizer(tokenizer=spiece_bytes).tokenize_with_weights("cat") == \
        tokenizer.tokenize_with_weights("cat")


def test_umt5_without_tokenizer_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="no 'spiece_model'"):
        UMT5XXlTokenizer(tokenizer_data={})


@pytest.mark.parametrize("bad", [torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.float32),
                                 torch.tensor(list(b"not a model"), dtype=torch.uint8)])
def test_bad_spiece_model_is_a_checkpoint_error(bad):
    with pytest.raises(CheckpointError, match="spiece_model"):
        SentencePieceTokenizer(bad)


def test_doctests():
    import doctest

    from textenc.text_encoders import t5

    result = doctest.testmod(t5)
    assert result.attempted and not result.failed
