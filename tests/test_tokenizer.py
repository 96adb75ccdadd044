"""SDTokenizer against transformers' CLIPTokenizer and hand-derived windows.

Plain-word ids come from ``transformers.CLIPTokenizer`` (an independent
oracle); weights, word ids and windows are derived by hand from ComfyUI's
rules, or from the small ComfyUI-style reference in this file.
"""

from __future__ import annotations

import concurrent.futures
import math
import re
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_prompt_parser import reference
from textenc.errors import PromptError, PromptWarning
from textenc.prompts.tokenizer import DEFAULT_VOCAB, SDTokenizer

START, END = 49406, 49407


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)


@pytest.fixture(scope="module")
def tok():
    return SDTokenizer()


def ids(hf, text):
    return hf(text)["input_ids"][1:-1]


def window(tokens, pad=END, length=77):
    """One hand-built window: start, tokens, end, padding."""
    body = [(START, 1.0, 0)] + tokens + [(END, 1.0, 0)]
    return body + [(pad, 1.0, 0)] * (length - len(body))


def expand(hf, units):
    """Hand-listed units (text, weight) → tokens with word id = position + 1."""
    return [(t, w, i + 1) for i, (text, w) in enumerate(units) for t in ids(hf, text)]


W11, W121 = 1.0 * 1.1, 1.0 * 1.1 * 1.1

# prompt → its groups (unit text, weight), in order; derived by hand.
HAND = [
    ("a cat", [("a cat", 1.0)]),
    ("a (red:1.2) fox", [("a ", 1.0), ("red", 1.2), (" fox", 1.0)]),
    ("(a) (b)", [("a", W11), (" ", 1.0), ("b", W11)]),  # the space is an (empty) group
    ("((masterpiece)), best quality", [("masterpiece", W121), (", best quality", 1.0)]),
    ("(a:1.3:x)", [("a:1.3:x", W11)]),
    ("(a:x:1.3)", [("a:x", 1.3)]),
    ("(a", [("(a", 1.0)]),
    ("a) (b)", [("a) (b)", 1.0)]),
    ("a)(b (c)", [("a)(b ", 1.0), ("c", W11)]),
    ("(a (b)", [("a ", W11), ("(b", W11)]),
    (r"\(a\) b", [("(a) b", 1.0)]),
    (r"(a\))", [("a)", W11)]),
    ("(:1.2)", [(":1.2", W11)]),
    ("()", []),
    ("(a:0)", [("a", 0.0)]),
    ("(a:-0.5)", [("a", -0.5)]),
    ("a embedding:x b", [("a", 1.0), ("embedding:x b", 1.0)]),  # split even without a folder
    ("a\nembedding:x", [("a", 1.0), ("embedding:x", 1.0)]),
    ("embedding:x", [("embedding:x", 1.0)]),
    ("aembedding:x", [("aembedding:x", 1.0)]),
    ("(a embedding:x:1.5)", [("a", 1.5), ("embedding:x", 1.5)]),
    ("Hello, World!", [("Hello, World!", 1.0)]),
    ("It's a test", [("It's a test", 1.0)]),
    ("we'll don't I'M", [("we'll don't I'M", 1.0)]),
    ("café naïve", [("café naïve", 1.0)]),
    ("e\u0301t\u00e9", [("e\u0301t\u00e9", 1.0)]),
    ("日本語のテキスト", [("日本語のテキスト", 1.0)]),
    ("🙂🔥 emoji", [("🙂🔥 emoji", 1.0)]),
    ("a  b\t\tc\n\nd", [("a  b\t\tc\n\nd", 1.0)]),
    ("x\x00y\x07z", [("x\x00y\x07z", 1.0)]),
    ("zero\u200bwidth", [("zero\u200bwidth", 1.0)]),
    ("rtl \u202eabc\u202c", [("rtl \u202eabc\u202c", 1.0)]),
    ("مرحبا بالعالم", [("مرحبا بالعالم", 1.0)]),
    ("1234567890", [("1234567890", 1.0)]),
    ("8k uhd, 35mm", [("8k uhd, 35mm", 1.0)]),
    ("<|endoftext|>", [("<|endoftext|>", 1.0)]),
    ("UPPER lower MiXeD", [("UPPER lower MiXeD", 1.0)]),
    ("#hashtag @user $5", [("#hashtag @user $5", 1.0)]),
    ("a-b_c.d/e\\f", [("a-b_c.d/e\\f", 1.0)]),
    ("(red:1.1), (blue:0.9)", [("red", 1.1), (", ", 1.0), ("blue", 0.9)]),
    ("(a (b (c)))", [("a ", W11), ("b ", W121), ("c", W121 * 1.1)]),
    ("((a:1.2) b)", [("a", 1.2), (" b", W11)]),
    ("(a b:1.5) c", [("a b", 1.5), (" c", 1.0)]),
    ("(a: 0.75 )", [("a", 0.75)]),
    ("((a)) ((b))", [("a", W121), (" ", 1.0), ("b", W121)]),
    ("(a:1.2)(b:0.8)", [("a", 1.2), ("b", 0.8)]),
    ("(a:1.)", [("a", 1.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:2)", [("a", 2.0)]),
    ("(a:b:c)", [("a:b:c", W11)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("(time 12:30)", [("time 12", 30.0)]),  # ComfyUI quirk: the last colon wins
    ("a (b) c (d) e", [("a ", 1.0), ("b", W11), (" c ", 1.0), ("d", W11), (" e", 1.0)]),
    ("  leading and trailing  ", [("  leading and trailing  ", 1.0)]),
    ("\n", [("\n", 1.0)]),
    ("   ", [("   ", 1.0)]),
    ("\ufeffbom", [("\ufeffbom", 1.0)]),
    ("x" * 30, [("x" * 30, 1.0)]),
    ("A photo of an astronaut riding a horse on mars",
     [("A photo of an astronaut riding a horse on mars", 1.0)]),
    ("(((a)))", [("a", W121 * 1.1)]),
    ("a)", [("a)", 1.0)]),
    ("(a\\:1.2)", [("a\\", 1.2)]),
]


@pytest.mark.parametrize(("prompt", "units"), HAND)
def test_hand_table(hf, tok, prompt, units):
    assert tok.tokenize_with_weights(prompt, return_word_ids=True) == [window(expand(hf, units))]
    assert tok.tokenize_with_weights(prompt) == [[(t, w) for t, w, _ in window(expand(hf, units))]]


CORPUS = ["", "a", "Hello, World!", "It'S  a\n\ntest 123", "日本語 café e\u0301", "🙂\u200d🔥", "\x00\x01\x7f",
          "\u200b\u202e\u2066", "ÅNGSTRÖM ﬁ ǅ İ", "١٢٣ ٤", "a\u0300\u0301\u0302", "\t\r\x0b\x0c\u3000x",
          "<|startoftext|>x<|endoftext|>", "don't we'll they're", "---===...!!!", "ß ẞ ς Σ", "x\ud83d\ude42y"]


@pytest.mark.parametrize("text", CORPUS)
def test_backend_matches_transformers(hf, tok, text):
    joined = text.encode("utf-16", "surrogatepass").decode("utf-16")  # HF refuses surrogate pairs
    assert tok.encode_units([text])[0] == ids(hf, joined)


def test_lone_surrogates_become_replacement_char(hf, tok):
    assert tok.encode_units(["a\ud800b"])[0] == ids(hf, "a\ufffdb")
    assert tok.tokenize_with_weights("\udfff(x)")[0][1][0] == ids(hf, "\ufffd")[0]


def test_tokenizer_json_folder_and_tokenizer_class(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists()
    prompt = "a (red:1.2) fox, 日本"
    expected = SDTokenizer().tokenize_with_weights(prompt, return_word_ids=True)
    assert SDTokenizer(str(tmp_path)).tokenize_with_weights(prompt, return_word_ids=True) == expected
    slow = SDTokenizer(tokenizer_class=type(hf))
    assert slow.tokenize_with_weights(prompt, return_word_ids=True) == expected


def test_empty_prompt_and_sd2_padding(tok):
    assert tok.tokenize_with_weights("") == [[(START, 1.0), (END, 1.0)] + [(END, 1.0)] * 75]
    sd2 = SDTokenizer(pad_with_end=False, embedding_size=1024)
    assert sd2.pad_token == 0
    assert sd2.tokenize_with_weights("a")[0][3:] == [(0, 1.0)] * 74


def test_long_group_is_split_at_the_window_edge(hf, tok):
    out = tok.tokenize_with_weights("a " * 76, return_word_ids=True)  # one group of 76 tokens
    a = ids(hf, "a")[0]
    assert out[0] == [(START, 1.0, 0)] + [(a, 1.0, 1)] * 75 + [(END, 1.0, 0)]
    assert out[1] == window([(a, 1.0, 1)])


def test_short_group_moves_whole_to_the_next_window(hf, tok):
    group = "(a b c d e:1.5)"  # 5 tokens per group, each its own group
    prompt = group * 15  # 75 tokens: exactly fills one window
    out = tok.tokenize_with_weights(prompt, return_word_ids=True)
    assert len(out) == 1 and out[0][-1] == (END, 1.0, 0) and out[0][75][2] == 15
    out = tok.tokenize_with_weights(prompt + group, return_word_ids=True)
    assert len(out) == 2
    assert out[0][76] == (END, 1.0, 0) and out[0][75][2] == 15
    letters = [(t, 1.5, 16) for t in ids(hf, "a b c d e")]
    assert out[1] == window(letters)
    # 14 groups (70 tokens) then 6 short tokens: 77 > 76, so the group moves and the gap is padded
    out = tok.tokenize_with_weights(group * 14 + "(a b c d e f:1.5)", return_word_ids=True)
    assert out[0][71:] == [(END, 1.0, 0)] + [(END, 1.0, 0)] * 5
    assert [x[2] for x in out[1][1:7]] == [15] * 6


def test_large_group_after_text_is_split(hf, tok):
    prompt = "(a b c d e:1.5)" * 14 + "(" + "x " * 10 + ")"  # 70 tokens, then a 10-token group
    out = tok.tokenize_with_weights(prompt, return_word_ids=True)
    x = ids(hf, "x")[0]
    assert out[0][71:] == [(x, W11, 15)] * 5 + [(END, 1.0, 0)]
    assert out[1][:6] == [(START, 1.0, 0)] + [(x, W11, 15)] * 5 and out[1][6] == (END, 1.0, 0)


def test_length_options(hf):
    short = SDTokenizer(max_length=10, pad_to_max_length=False)
    out = short.tokenize_with_weights("a b c d e f g h i j k")
    assert [len(w) for w in out] == [10, 5]
    assert SDTokenizer(min_length=80).tokenize_with_weights("a")[0][-1] == (END, 1.0)
    assert len(SDTokenizer(min_length=80).tokenize_with_weights("a")[0]) == 80
    assert len(SDTokenizer(tokenizer_data={"clip_l_max_length": 20}).tokenize_with_weights("a")[0]) == 20


def test_break_keyword(hf):
    breaking = SDTokenizer(break_keyword=True)
    out = breaking.tokenize_with_weights("a BREAK b", return_word_ids=True)
    assert out == [window([(ids(hf, "a")[0], 1.0, 1)]), window([(ids(hf, "b")[0], 1.0, 2)])]
    assert len(breaking.tokenize_with_weights("BREAK a BREAK")) == 1
    assert len(SDTokenizer().tokenize_with_weights("a BREAK b")) == 1


def test_a1111_and_square_brackets(hf):
    out = SDTokenizer(weight_convention="a1111", square_brackets=True).tokenize_with_weights("((a:2)) [b]")
    assert out[0][1] == (ids(hf, "a")[0], 1.0 * 1.1 * 2.0)
    assert out[0][2] == (ids(hf, "b")[0], 1.0 * (1 / 1.1))


def test_disable_weights_keeps_escapes_resolved(hf, tok):
    out = tok.tokenize_with_weights(r"(a:1.5) \(b\)", disable_weights=True)
    assert [t for t, _ in out[0][1:-1] if t != END] == ids(hf, "(a:1.5) (b)")


def test_untokenize_and_state_dict(tok):
    pairs = tok.tokenize_with_weights("a cat")[0][:3]
    assert tok.untokenize(pairs) == [((START, 1.0), "<|startoftext|>"), (pairs[1], "a</w>"), (pairs[2], "cat</w>")]
    assert tok.state_dict() == {}
    assert (tok.max_word_length, tok.embedding_identifier, tok.max_length) == (8, "embedding:", 77)


def test_inspect_reports_units_and_windows(tok):
    report = tok.inspect("a (red:1.2) fox")
    assert [(u.word_id, u.kind, u.text, u.weight) for u in report.units] == [
        (1, "text", "a ", 1.0), (2, "text", "red", 1.2), (3, "text", " fox", 1.0)]
    assert [t.text for t in report.windows[0][:4]] == ["<|startoftext|>", "a</w>", "red</w>", "fox</w>"]
    assert report.embeddings == []


def test_errors_are_typed(tok):
    with pytest.raises(PromptError):
        tok.tokenize_with_weights("(a:nan)")
    with pytest.raises(PromptError):
        tok.tokenize_with_weights(None)  # type: ignore[arg-type]
    with pytest.raises(PromptError):
        SDTokenizer(max_prompt_chars=5).tokenize_with_weights("abcdef")


def comfy_reference(hf, prompt, max_length=77):
    """ComfyUI's tokenize_with_weights (no embeddings), written from its rules."""
    groups = []
    for segment, weight in reference(prompt):
        split = re.split(" embedding:|\nembedding:", segment)
        pieces = [p for p in [split[0]] + ["embedding:" + s for s in split[1:]] if p]
        groups += [[(t, weight) for t in ids(hf, p)] for p in pieces]
    batch = [(START, 1.0, 0)]
    batches = [batch]
    for i, group in enumerate(groups):
        large = len(group) >= 8
        while group:
            if len(group) + len(batch) > max_length - 1:
                remaining = max_length - len(batch) - 1
                if large:
                    batch.extend((t, w, i + 1) for t, w in group[:remaining])
                    batch.append((END, 1.0, 0))
                    group = group[remaining:]
                else:
                    batch.append((END, 1.0, 0))
                    batch.extend([(END, 1.0, 0)] * remaining)
                batch = [(START, 1.0, 0)]
                batches.append(batch)
            else:
                batch.extend((t, w, i + 1) for t, w in group)
                group = []
    batch.append((END, 1.0, 0))
    batch.extend([(END, 1.0, 0)] * (max_length - len(batch)))
    return batches


_WORDS = st.sampled_from(["a", "cat", "red", "(", ")", ":", "1.2", "0.5", " ", ",", "\\(", "\\)", "embedding:",
                          "\n", "masterpiece", "日本", "🙂", "x y z w v u t s r",
                          "1e1", "2E-1", "1_0", "1.5e0", "\u0661.\u0665"])


@settings(max_examples=200, deadline=None)
@given(st.lists(_WORDS, max_size=40))
def test_matches_comfy_reference(hf, tok, words):
    prompt = "".join(words)
    expected = comfy_reference(hf, prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # large weights; "embedding:" read as text without a folder
        assert tok.tokenize_with_weights(prompt, return_word_ids=True) == expected


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_properties_on_arbitrary_text(tok, prompt):
    try:
        out = tok.tokenize_with_weights(prompt, return_word_ids=True)
    except PromptError:
        return
    last = 0
    for window_ in out:
        assert len(window_) == 77 and window_[0][0] == START
        for _, weight, word_id in window_:
            assert math.isfinite(weight) and abs(weight) < 3.4e38
            if word_id:
                assert word_id >= last
                last = word_id


def test_threads_share_one_tokenizer():
    shared = SDTokenizer(cache_size=16)
    prompts = [f"(word{i}:1.{i % 9}) a photo of {i} cats, ((detailed)) " * (1 + i % 5) for i in range(120)]
    reference_tokenizer = SDTokenizer()
    serial = [reference_tokenizer.tokenize_with_weights(p, return_word_ids=True) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda p: shared.tokenize_with_weights(p, return_word_ids=True), prompts * 2))
    assert parallel == serial * 2


def test_one_megabyte_prompt_within_bounds(tok):
    """The size limits hold; their speed is bench/bench_prompt.py's (never a timed unit test)."""
    prompt = ("masterpiece, (best quality:1.2), a (red fox:1.1) in the ((snowy forest)), 8k " * 20_000)[:1_048_576]
    out = tok.tokenize_with_weights(prompt, max_windows=None)
    assert len(out) > 1000
    with pytest.raises(PromptError):  # one character over max_prompt_chars
        tok.tokenize_with_weights(prompt + "x", max_windows=None)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_word_cached_encoding_matches_transformers(hf, tok, text):
    """Units are encoded word by word with a cache; the result must equal HF on the whole text."""
    assert tok.encode_units([text, text.upper()]) == [ids(hf, text), ids(hf, text.upper())]


@pytest.mark.parametrize("options", [{"weight_convention": "a1111"}, {"square_brackets": True},
                                     {"break_keyword": True}])
def test_per_call_parse_options_equal_constructor_options_and_do_not_stick(options):
    prompt = "((a (b:1.5))) [c] BREAK d"
    shared = SDTokenizer()
    dedicated = SDTokenizer(**options)
    assert shared.tokenize_with_weights(prompt, True, **options) == dedicated.tokenize_with_weights(prompt, True)
    assert shared.tokenize_with_weights(prompt, True) == SDTokenizer().tokenize_with_weights(prompt, True)


def test_max_windows_refuses_long_prompts_before_encoding(hf):
    capacity = 75
    exact = " ".join(["cat"] * (capacity * 3))  # "cat" is one token: exactly three full windows
    assert len(ids(hf, exact)) == capacity * 3
    assert len(SDTokenizer(max_windows=3).tokenize_with_weights(exact)) == 3
    with pytest.raises(PromptError, match=r"more than max_windows=2 windows of 75 tokens"):
        SDTokenizer(max_windows=2).tokenize_with_weights(exact)
    with pytest.raises(PromptError, match="max_windows=2"):
        SDTokenizer().tokenize_with_weights(exact, max_windows=2)  # per call
    assert len(SDTokenizer(max_windows=2).tokenize_with_weights(exact, max_windows=None)) == 3
    # Packing wastes space (short groups move whole): the exact count is checked after packing.
    with pytest.raises(PromptError, match="prompt needs 3 windows"):
        SDTokenizer(max_windows=2, break_keyword=True).tokenize_with_weights("a BREAK b BREAK c")
    with pytest.raises(PromptError, match="max_windows must be"):
        SDTokenizer(max_windows=0)


def test_default_max_windows_is_256_and_long_words_are_counted_in_chunks(hf):
    tok = SDTokenizer()
    assert len(tok.tokenize_with_weights("cat " * (256 * 75))) == 256
    with pytest.raises(PromptError, match=r"max_windows=256 .*about \d+ windows in all"):
        tok.tokenize_with_weights("cat " * (256 * 75 + 1))
    long_text = "masterpiece, a red fox " * 4000  # one unit of 92,000 characters: tokenized in chunks
    assert tok.tokenize_with_weights(long_text, max_windows=None) == SDTokenizer(tokenizer_class=type(hf)).tokenize_with_weights(long_text, max_windows=None)


def test_inspect_lists_large_weights(tok):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = tok.inspect("a (b:150) (c) (see https://example.com:8080)")
    assert [(s.text, s.weight) for s in report.large_weights] == [("b", 150.0), ("see https://example.com", 8080.0)]
    assert caught and caught[0].filename == __file__


def test_token_text_is_the_vocabulary_entry(hf, tok):
    import torch

    for token in (START, END, 320, 2368, 49405):
        assert tok.token_text(token) == hf.convert_ids_to_tokens(token)
    assert tok.token_text(10 ** 6) == "<unknown>"
    assert tok.token_text(torch.zeros(768)) == "<embedding>"


def test_doctests():
    import doctest

    from textenc.prompts import tokenizer

    result = doctest.testmod(tokenizer)
    assert result.attempted >= 3 and result.failed == 0


def test_textenc_has_no_import_circle():
    """No textenc module reaches itself through imports, counting those inside
    functions (a lazy import can hide a circle) and ``if TYPE_CHECKING:`` ones.
    The tokenizer, its dialects and the embeddings once had such a hidden circle."""
    from import_graph import import_circles, import_graph

    graph = import_graph("textenc")
    assert "textenc.prompts.report" in graph["textenc.prompts.dialects.a1111.report"]  # the graph sees imports
    assert "textenc.prompts.dialects.compel" in graph["textenc.prompts.tokenizer"] or \
        "textenc.prompts.dialects" in graph["textenc.prompts.tokenizer"]
    assert import_circles("textenc") == []
