"""The compel parser's run-of-plain-words reading (issue 27, point 5) against compel's own
parser: the hostile shapes of bench/bench_hostile_prompts.py at small sizes, plain words
next to every construct that could take them over, and seeded random prompts.

The timings are in bench/bench_hostile_prompts.py (rows ``compel``); here only results.
"""

from __future__ import annotations

import random

import pytest

compel = pytest.importorskip("compel")

import compel_prompts  # noqa: E402
from compel_prompts import compel_structure as theirs, textenc_structure as ours  # noqa: E402
from textenc.errors import PromptError  # noqa: E402
from textenc.prompts.dialects.compel import parse_compel  # noqa: E402

HOSTILE_UNITS = ["BREAK ", "a ", "embedding:missing ", "[a|b] "]

#: plain words beside each construct that may claim the last (or first) of them
NEIGHBOURS = [
    "a b c.attend(0.5) d e", "a b c .attend(0.5) d", "a b c\t.attend(1.3)", "a b (c d)0.5 e f", "a b(c)0.5 d",
    "a b c+ d e", "a b c- d", "a b c++", "a b c 0.5 d", "a b c.", "a b c. d e", "a b c, d e", "a b c,d e",
    "a b \"c d\" e", "a b \"c d\"0.5 e f", "a (b c d e) f g", "a (b c d e f", "a \"b c d e f\" g", "a useLora b c",
    "a b c useLora d e", "x \\(y z\\) w v", "a b\\ c d", "a b\xa0c d e",
    "a\r\nb\n\nc\td", "  a   b  ", "a b c=d e", "a-b c-d e", "a b c-", "a b (c)", "(a b c d).attend(0.7) e f",
    '("a b c", "d e f").blend(0.7, 0.3)', '("a b c", "d e (f)0.5").and()', "(a b c, d e f).and(1, 0.5)",
    "a b \\\\(c d e", 'a b \\"c d e f', "word\\, x y z", "a b c.blend d e", "a b c (d", "a b c )d e",
]
ATOMS = ["a", "cat", "BREAK", "embedding:x", "[a|b]", "w ", " ", "  ", "\t", "\n", "\x0b", "\xa0",
         "(", ")", '"', ",", ".", "+", "-", "\\", ".attend(", "0.5", "1.2", ".blend(", ".and(", ":",
         "x y z ", "a-b", "\\(", '\\"', "))", "0", "+ ", " .", " ("]


@pytest.fixture(scope="module")
def compel_parser():
    with compel_prompts.one_compel_parser(compel) as parser:
        yield parser


@pytest.mark.parametrize("unit", HOSTILE_UNITS)
def test_hostile_shapes_parse_as_compel(compel_parser, unit):
    for count in (1, 2, 3, 40, 100):
        for text in (unit * count, (unit * count)[:-1], (unit * count).strip() + "+", "(" + unit * count + ")0.5"):
            assert ours(text) == theirs(compel_parser, text), repr(text[:60])


def test_plain_words_beside_syntax_parse_as_compel(compel_parser):
    for prompt in NEIGHBOURS:
        assert ours(prompt) == theirs(compel_parser, prompt), repr(prompt)


def test_plain_words_before_swap_and_lora_are_still_refused():
    for prompt in ("a b c.swap(d) e", "a b c .swap(d)", "a b useLora(x, 0.5) c", "a b withLora (x) c"):
        with pytest.raises(PromptError, match="swap|LoRA"):
            parse_compel(prompt)


def test_random_prompts_parse_as_compel(compel_parser):
    rng = random.Random(27)
    compared = 0
    for _ in range(600):
        prompt = "".join(rng.choice(ATOMS) for _ in range(rng.randint(0, 12)))
        try:
            expected = theirs(compel_parser, prompt)
        except Exception:  # noqa: BLE001 - pyparsing's own refusals; compel fails on these too
            continue
        if not expected:  # compel's empty conjunction: textenc reads it as the empty prompt
            assert ours(prompt) == [(1.0, None, True, [[("", 1.0)]])], repr(prompt)
            continue
        assert ours(prompt) == expected, repr(prompt)
        compared += 1
    assert compared > 400


def test_max_windows_is_refused_while_chunking_untruncated_prompts():
    from textenc.prompts.tokenizer import SDTokenizer

    tokenizer = SDTokenizer()
    text = "a " * (75 * 3)  # exactly three chunks of 75 ids
    windows = tokenizer.tokenize_with_weights(text, syntax="compel", truncate_long_prompts=False, max_windows=3)
    assert len(windows) == 3
    with pytest.raises(PromptError, match=r"more than 2 windows of 77 tokens, more than max_windows=2 "
                                          r"\(syntax='compel'\)"):
        tokenizer.tokenize_with_weights(text, syntax="compel", truncate_long_prompts=False, max_windows=2)
    with pytest.raises(PromptError, match="max_windows=2"):
        tokenizer.inspect(text, syntax="compel", truncate_long_prompts=False, max_windows=2)
    with pytest.raises(PromptError, match="max_windows=1"):  # one window per .and() part
        tokenizer.tokenize_with_weights('("a", "b").and()', syntax="compel", max_windows=1)
