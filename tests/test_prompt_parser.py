"""Tests of textenc.prompts.parser against hand tables and a reference oracle.

The oracle is :mod:`comfy_reference`'s plain recursive restatement of ComfyUI's rules
(``parse_parentheses`` / ``token_weights`` / ``escape_important``), used on generated
prompts small enough to recurse.
"""

from __future__ import annotations

import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comfy_reference import prompt_weights as reference
from hypothesis_profiles import examples
from textenc.errors import PromptError, PromptWarning
from textenc.prompts.parser import ParseOptions, parse_prompt

def pairs(text: str, **options) -> list[tuple[str, float]]:
    return [(s.text, s.weight) for s in parse_prompt(text, **options)]


# --- hand tables -------------------------------------------------------------

W11, W121, W1331 = 1.0 * 1.1, 1.0 * 1.1 * 1.1, 1.0 * 1.1 * 1.1 * 1.1

HAND = [
    ("", []),
    ("a cat", [("a cat", 1.0)]),
    ("a (red:1.2) fox", [("a ", 1.0), ("red", 1.2), (" fox", 1.0)]),
    ("(a)", [("a", W11)]),
    ("((a))", [("a", W121)]),
    ("(((a)))", [("a", W1331)]),
    ("((a:1.5))", [("a", 1.5)]),
    ("((a):1.5)", [("a", 1.5 * 1.1)]),
    ("(a:0.5) b", [("a", 0.5), (" b", 1.0)]),
    ("(a:1.3:x)", [("a:1.3:x", W11)]),
    ("(a:x:1.3)", [("a:x", 1.3)]),
    ("(:1.2)", [(":1.2", W11)]),
    ("()", []),
    ("(())", []),
    ("(a", [("(a", 1.0)]),
    ("a (b", [("a ", 1.0), ("(b", 1.0)]),
    ("(a (b)", [("a ", W11), ("(b", W11)]),
    ("((a)", [("(a", W11)]),
    ("((a:1.5)", [("(a", 1.5)]),
    ("a)", [("a)", 1.0)]),
    ("a) (b)", [("a) (b)", 1.0)]),
    ("a)(b)) (c)", [("a)(b)) (c)", 1.0)]),
    ("a)(b (c)", [("a)(b ", 1.0), ("c", W11)]),
    ("(x)) (y)", [("x", W11), (") (y)", 1.0)]),
    (r"\(a\)", [("(a)", 1.0)]),
    (r"\(a\) (b:0.5)", [("(a) ", 1.0), ("b", 0.5)]),
    (r"(a\))", [("a)", W11)]),
    (r"(a:1.2\))", [("a:1.2)", W11)]),
    (r"\\(a)", [("\\(a)", 1.0)]),  # no double-escape: "\\(" is "\\" + escaped "("
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:+.5)", [("a", 0.5)]),
    ("(a:2.)", [("a", 2.0)]),
    ("(a:b) c", [("a:b", W11), (" c", 1.0)]),
    ("(a (b:2) c)", [("a ", W11), ("b", 2.0), (" c", W11)]),
    ("(a (b) c:0.5)", [("a ", 0.5), ("b", 0.5 * 1.1), (" c", 0.5)]),
    ("x\0\1y", [("x\0\1y", 1.0)]),  # ComfyUI's sentinel collision does not happen here
    ("\0\2(a)", [("\0\2", 1.0), ("a", W11)]),
]


@pytest.mark.parametrize(("prompt", "expected"), HAND)
def test_hand_table(prompt, expected):
    assert pairs(prompt) == expected


def test_hand_table_agrees_with_oracle_where_no_sentinel_collision():
    for prompt, expected in HAND:
        if "\0" not in prompt:
            assert reference(prompt) == expected, prompt


def test_a1111_multiplies_explicit_weights():
    assert pairs("((a:1.5))", weight_convention="a1111") == [("a", 1.0 * 1.1 * 1.5)]
    assert pairs("(a:0.5)", weight_convention="a1111") == [("a", 0.5)]


def test_square_brackets():
    assert pairs("[a]", square_brackets=True) == [("a", 1.0 * (1 / 1.1))]
    assert pairs("[a]") == [("[a]", 1.0)]
    assert pairs(r"\[a\] ([b])", square_brackets=True) == [("[a] ", 1.0), ("b", 1.1 * (1 / 1.1))]
    assert pairs("(a]", square_brackets=True) == [("(a]", 1.0)]
    assert pairs("[a:1.5]", square_brackets=True) == [("a:1.5", 1 / 1.1)]


def test_break_keyword():
    segs = parse_prompt("a BREAK b (c BREAK d) BREAKx", break_keyword=True)
    assert [(s.text, s.is_break) for s in segs] == [
        ("a", False), ("BREAK", True), ("b ", False), ("c", False), ("BREAK", True), ("d", False),
        (" BREAKx", False)]
    assert [s.text for s in parse_prompt("a BREAK b")] == ["a BREAK b"]


def test_offsets_point_into_the_source():
    prompt = r"x \(y\) (zz:1.5)"
    segs = parse_prompt(prompt)
    assert [(prompt[s.start:s.end], s.text) for s in segs] == [(r"x \(y\) ", "x (y) "), ("zz", "zz")]


# What Python's float() accepts is a weight, as in ComfyUI (``weight = float(x[xx+1:])``);
# the expected values are float()'s own, independent of textenc.
FLOAT_LITERALS = ["1e1", "1.5e0", "2E-1", "1e-999", "1_0", "\u0661.\u0665", "\uff11.\uff15", " 1.5 ", "+.5",
                  "-2", "1E+1", "1.", "\u0967", "3e38"]


@pytest.mark.parametrize("literal", FLOAT_LITERALS)
def test_float_literals_are_weights_as_in_comfyui(literal):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptWarning)
        assert pairs(f"abc (word:{literal})") == [("abc ", 1.0), ("word", float(literal))]
        assert pairs(f"abc (word:{literal})") == reference(f"abc (word:{literal})")


@pytest.mark.parametrize("literal", ["nan", "NaN", "inf", "-inf", "Infinity", "1e39", "-1e39", "1e999", " nan "])
def test_non_finite_weights_are_refused_with_fragment_and_position(literal):
    prompt = f"abc (word:{literal})"
    with pytest.raises(PromptError, match=r"weight '.*' of 'word' at character 10 is not a finite float32"):
        parse_prompt(prompt)


@pytest.mark.parametrize("literal", ["0x10", "1.2.3", "1,5", "one", "1e", "--1", "1 2"])
def test_literals_float_rejects_stay_text(literal):
    assert pairs(f"(word:{literal})") == reference(f"(word:{literal})") == [(f"word:{literal}", 1.1)]


@pytest.mark.parametrize("literal", ["1e3", "1E-2", "1_0", "\u0661", "\uff11"])
def test_strict_weights_keeps_the_plain_decimal_grammar(literal):
    with pytest.raises(PromptError, match=r"'word' at character 10 is not a plain decimal"):
        parse_prompt(f"abc (word:{literal})", strict_weights=True)
    assert pairs("(word: 1.5 )", strict_weights=True) == [("word", 1.5)]


def test_large_weights_warn_at_the_caller_and_max_weight_refuses():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pairs("(a:101)") == [("a", 101.0)]
    assert len(caught) == 1 and caught[0].category is PromptWarning
    assert caught[0].filename == __file__ and "'a' at character 1 has weight 101" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pairs("(a:100)") == [("a", 100.0)]  # at the threshold: no warning
        assert pairs("(a:101)", warn_weight_above=None) == [("a", 101.0)]
        assert pairs("(a:101)", warn_weight_above=200.0) == [("a", 101.0)]
    with pytest.raises(PromptError, match="max_weight=100"):
        parse_prompt("(a:101)", max_weight=100.0)
    with pytest.raises(PromptError):
        parse_prompt("(a:" + "9" * 400 + ")")  # float() overflows to inf
    with pytest.raises(PromptError, match="not a finite float32"):
        parse_prompt("(" * 1000 + "a" + ")" * 1000)  # 1.1**1000 ~ 2.5e41 > float32 max


def test_deep_nesting_and_url_weights_are_kept_as_comfyui():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deep = pairs("(" * 300 + "a" + ")" * 300)
        url = pairs("(see https://example.com:8080) fox")
    assert deep == reference("(" * 300 + "a" + ")" * 300) and 2.5e12 < deep[0][1] < 2.7e12
    assert url == reference("(see https://example.com:8080) fox") == [("see https://example.com", 8080.0), (" fox", 1.0)]
    assert [c.category for c in caught] == [PromptWarning, PromptWarning]


def test_prompt_length_limit_and_type():
    with pytest.raises(PromptError, match="max_prompt_chars"):
        parse_prompt("a" * 11, max_prompt_chars=10)
    with pytest.raises(PromptError):
        parse_prompt(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(PromptError):
        ParseOptions(weight_convention="nope")


def test_deep_nesting_is_iterative():
    """100,000 levels parse without recursion (time is bench/bench_prompt.py's, not a unit test's)."""
    depth = 100_000
    assert pairs("(" * depth + "a:1" + ")" * depth) == [("a", 1.0)]
    with pytest.raises(PromptError):
        parse_prompt("(" * depth + "a" + ")" * depth)
    assert len(parse_prompt("(" * depth + "a")) == 1
    assert len(parse_prompt(")" * depth + "a" + "(" * depth)) == 1


def test_deep_refusal_names_the_fragment_and_its_place():
    depth = 100_000  # 1.1 ** 100_000 overflows to inf long before the innermost level
    with pytest.raises(PromptError, match=r"weight inf of 'a' at character 100000 is not a finite float32"):
        parse_prompt("(" * depth + "a" + ")" * depth)
    with pytest.raises(PromptError, match=r"weight inf of 'b' at character 100001 "):
        parse_prompt("(" * depth + "[b]" + ")" * depth, square_brackets=True)


@pytest.mark.parametrize("prompt", [
    "(" * 200 + "a" + ")" * 200,
    "(" * 150 + "a:0.5" + ")" * 150 + " b",
    "((x ((((y:2)))) z))",
    "(((a)) (b))",
    "((a) )",
    "( (a))",
    "(((a:1.5) ))",
    "((((a)))" + ")" * 3,
    ")((a))(",
    "((a\\)))",
    "(" * 120 + "c:" + "(" * 30 + "d" + ")" * 30 + ")" * 120,
    "(" * 100 + "e:1.1" + ")" * 60,
])
@pytest.mark.parametrize("a1111", [False, True])
def test_nested_groups_match_the_oracle(prompt, a1111):
    """``((x))`` levels are stepped through without frames; results stay ComfyUI's."""
    options = {"weight_convention": "a1111" if a1111 else "comfy", "warn_weight_above": None}
    assert pairs(prompt, **options) == reference(prompt, a1111)


def test_doctests():
    import doctest

    from textenc.prompts import brackets as prompt_brackets, parser as prompt_parser

    for module in (prompt_parser, prompt_brackets):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@pytest.mark.slow
def test_one_megabyte_prompt_parses():
    prompt = ("(a:1.2) \\(b\\) (c) d:e, " * 50_000)[:1_000_000]
    segs = parse_prompt(prompt)
    assert segs[0].text == "a" and segs[0].weight == 1.2


_ALPHABET = st.sampled_from(list("ab (():)):.1 5\\-+"))


@settings(max_examples=examples(400), deadline=None)
@given(st.text(_ALPHABET, max_size=40), st.booleans())
def test_matches_reference_oracle(prompt, a1111):
    expected = reference(prompt, a1111)
    options = {"weight_convention": "a1111" if a1111 else "comfy", "warn_weight_above": None}
    if any(not abs(w) < 3.4e38 for _, w in expected):
        with pytest.raises(PromptError):
            parse_prompt(prompt, **options)
    else:
        assert pairs(prompt, **options) == expected


@settings(max_examples=examples(300), deadline=None)
@given(st.text(max_size=60), st.booleans(), st.booleans())
def test_never_crashes_and_weights_are_finite(prompt, square, brk):
    try:
        segs = parse_prompt(prompt, square_brackets=square, break_keyword=brk, warn_weight_above=None)
    except PromptError:
        return
    for seg in segs:
        assert seg.text and math.isfinite(seg.weight) and abs(seg.weight) < 3.4e38
        assert 0 <= seg.start < seg.end <= len(prompt)
