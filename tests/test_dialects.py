"""The dialect registry: names, default weight modes, and cheap imports for command lines."""

from __future__ import annotations

import subprocess
import sys

import pytest

from textenc.prompts.dialects import SYNTAXES, check_syntax, default_weight_mode, get_dialect
from textenc.errors import PromptError


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_the_listed_default_weight_mode_is_the_dialects_own(syntax):
    dialect = get_dialect(syntax)
    assert dialect.name == syntax
    assert default_weight_mode(syntax) == dialect.default_weight_mode


def test_unknown_syntax_names_the_choices():
    with pytest.raises(PromptError, match="unknown prompt syntax 'nai'; choose one of comfy, a1111, compel"):
        check_syntax("nai")
    assert default_weight_mode(None) == "comfy"


def test_listing_the_syntaxes_imports_no_torch():
    code = "import sys; from textenc.prompts.dialects import SYNTAXES, default_weight_mode; " \
           "default_weight_mode('a1111'); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# A per-call refinement of one dialect, at a value that changes that dialect's reading:
# (keyword, value, a prompt whose windows the value changes under its own syntax).
_REFINED = [
    ("weight_convention", "a1111", "a ((cat:1.5)) on a mat"),
    ("square_brackets", True, "a [cat] on a mat"),
    ("break_keyword", True, "a cat BREAK on a mat"),
    ("strict_weights", True, "a (cat:1e0) on a mat"),
    ("comma_padding_backtrack", 0, " ".join(["dog"] * 64) + ", " + " ".join(["bird"] * 30)),
]


def _read(tok, prompt, **kwargs):
    """The windows, or the refusal's message (strict_weights refuses rather than rereads)."""
    try:
        return tok.tokenize_with_weights(prompt, **kwargs)
    except PromptError as exc:
        return str(exc)


@pytest.mark.parametrize("name,value,prompt", _REFINED, ids=[r[0] for r in _REFINED])
def test_a_refinement_is_refused_by_the_syntaxes_it_does_not_refine(name, value, prompt):
    """Each refinement changes its own dialect's windows, and every other syntax refuses it
    (before, they ignored it silently: one option, one meaning). At its default it is
    accepted everywhere and changes nothing."""
    from textenc.prompts.dialects import REFINEMENTS
    from textenc.prompts.tokenizer import SDTokenizer

    tok = SDTokenizer()
    owner, default = REFINEMENTS[name]
    assert _read(tok, prompt, syntax=owner, **{name: value}) != _read(tok, prompt, syntax=owner), \
        "the refinement must matter to its own syntax"
    for syntax in SYNTAXES:
        if syntax == owner:
            continue
        message = rf"{name}={value!r} refines syntax='{owner}' only; syntax='{syntax}'"
        with pytest.raises(PromptError, match=message):
            tok.tokenize_with_weights(prompt, syntax=syntax, **{name: value})
        with pytest.raises(PromptError, match=message):
            tok.inspect(prompt, syntax=syntax, **{name: value})
        assert (tok.tokenize_with_weights(prompt, syntax=syntax, **{name: default})
                == tok.tokenize_with_weights(prompt, syntax=syntax))


def test_a1111_backtrack_default_is_the_registered_one():
    from textenc.prompts.dialects import REFINEMENTS
    from textenc.prompts.dialects.a1111.chunks import DEFAULT_BACKTRACK

    assert DEFAULT_BACKTRACK == REFINEMENTS["comma_padding_backtrack"][1] == 20  # A1111's shared.opts default


# The tokenizer's limits hold under every syntax (a1111 and compel ignored them before).
# A prompt weighting "cat" by 1000 in each dialect's own grammar (A1111's and ComfyUI's
# "(x:w)", compel's "(x)w"), and the keywords that make a prompt longer than one window.
_HEAVY = {"comfy": "a (cat:1000) on a mat", "a1111": "a (cat:1000) on a mat", "compel": "a (cat)1000 on a mat"}
_LONG_OK = {"compel": {"truncate_long_prompts": False}}


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_max_weight_and_warn_weight_above_hold_for_every_syntax(syntax):
    import warnings

    from textenc.errors import PromptWarning
    from textenc.prompts.tokenizer import SDTokenizer

    tok = SDTokenizer()
    text = _HEAVY[syntax]
    windows = tok.tokenize_with_weights(text, syntax=syntax, max_weight=1000.0, warn_weight_above=None)
    assert max(w for _, w in windows[0]) == pytest.approx(1000.0), "the dialect must read the weight"
    with pytest.raises(PromptError, match=r"max_weight=999"):
        tok.tokenize_with_weights(text, syntax=syntax, max_weight=999.0)
    with pytest.raises(PromptError, match=r"max_weight=999"):
        tok.inspect(text, syntax=syntax, max_weight=999.0)
    with pytest.warns(PromptWarning, match=r"weights above 100"):
        tok.tokenize_with_weights(text, syntax=syntax)  # the default warn_weight_above
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.tokenize_with_weights(text, syntax=syntax, warn_weight_above=None)
        tok.tokenize_with_weights(text.replace("1000", "2"), syntax=syntax)
    limited = SDTokenizer(max_weight=999.0)  # set on the tokenizer, not per call
    with pytest.raises(PromptError, match=r"max_weight=999"):
        limited.tokenize_with_weights(text, syntax=syntax)


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_max_windows_holds_for_every_syntax(syntax):
    from textenc.prompts.tokenizer import SDTokenizer

    tok = SDTokenizer()
    text = " ".join(["cat"] * 200)  # 200 tokens: 3 windows of 75 in every dialect
    extra = _LONG_OK.get(syntax, {})
    assert len(tok.tokenize_with_weights(text, syntax=syntax, max_windows=3, **extra)) == 3
    with pytest.raises(PromptError, match=r"max_windows=2\b"):
        tok.tokenize_with_weights(text, syntax=syntax, max_windows=2, **extra)
    with pytest.raises(PromptError, match=r"max_windows=2\b"):
        SDTokenizer(max_windows=2).tokenize_with_weights(text, syntax=syntax, **extra)
    with pytest.raises(PromptError, match=r"max_windows=2\b"):
        tok.inspect(text, syntax=syntax, max_windows=2, **extra)


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_max_prompt_chars_holds_for_every_syntax(syntax):
    from textenc.prompts.tokenizer import SDTokenizer

    tok = SDTokenizer(max_prompt_chars=100)
    assert tok.tokenize_with_weights("a" * 100, syntax=syntax)
    with pytest.raises(PromptError, match=r"101 characters, more than max_prompt_chars=100"):
        tok.tokenize_with_weights("a" * 101, syntax=syntax)
    with pytest.raises(PromptError, match=r"101 characters, more than max_prompt_chars=100"):
        tok.inspect("a" * 101, syntax=syntax)


# Weights that are not finite: a weight literal of hundreds of digits reads as infinity
# (A1111 and compel then give NaN conditioning; ComfyUI's syntax refuses it while parsing).
_INFINITE = {"comfy": "a (cat:" + "9" * 400 + ")", "a1111": "a (cat:" + "9" * 400 + ")",
             "compel": "a (cat)" + "9" * 400 + ".0 on a mat"}


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_an_infinite_weight_is_refused_by_every_syntax(syntax):
    from textenc.prompts.tokenizer import SDTokenizer

    tok = SDTokenizer()
    with pytest.raises(PromptError, match=r"finite"):
        tok.tokenize_with_weights(_INFINITE[syntax], syntax=syntax)
    with pytest.raises(PromptError, match=r"finite"):
        tok.inspect(_INFINITE[syntax], syntax=syntax)


def test_compel_plus_signs_past_float_range_are_a_prompt_error():
    from textenc.prompts.tokenizer import SDTokenizer

    tok = SDTokenizer()
    with pytest.raises(PromptError, match=r"8000 '\+' signs at character 1"):
        tok.tokenize_with_weights("x" + "+" * 8000, syntax="compel")
    assert tok.tokenize_with_weights("x" + "+" * 20, syntax="compel")[0][1][1] == pytest.approx(1.1 ** 20)


@pytest.mark.parametrize("name", ["square_brackets", "break_keyword", "strict_weights"])
@pytest.mark.parametrize("value", ["yes", None, 1])
def test_switches_must_be_booleans(name, value):
    from textenc.prompts.tokenizer import SDTokenizer

    with pytest.raises(PromptError, match=rf"{name} must be True or False"):
        SDTokenizer().tokenize_with_weights("a [b]", **{name: value})
    with pytest.raises(PromptError, match=rf"{name} must be True or False"):
        SDTokenizer(**{name: value}).tokenize_with_weights("a [b]")
