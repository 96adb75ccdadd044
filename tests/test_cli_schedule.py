"""``textenc inspect --steps N``: A1111 prompt schedules (prompt editing ``[a:b:when]``,
alternation ``[a|b]``, ``AND`` parts) printed per part and per text, checked against
A1111's documented semantics (``a1111_reference``, an independent oracle; cases from
A1111's wiki and its parser's doctests), against the conditioning
``CLIP.encode_scheduled`` builds for the same ``steps``, and its usage errors."""

from __future__ import annotations

import json

import pytest

from a1111_reference import OracleClip, active_entry, oracle_and_parts, oracle_schedule
from textenc.cli import main
from textenc.commands.inspect import SCHEDULED_SYNTAXES
from textenc.prompts.dialects import SYNTAXES, get_dialect
from textenc.prompts.tokenizer import DEFAULT_VOCAB

transformers = pytest.importorskip("transformers")

LONG = ", ".join(["a red fox in the snow"] * 16)
CASES = [
    ("a [fantasy:cyberpunk:16] landscape", 100),   # A1111 wiki, prompt editing
    ("a [fantasy:cyberpunk:0.25] landscape", 20),  # a fraction of the steps
    ("a [b:3]", 10),                               # A1111 doctest: [[3, 'a '], [10, 'a b']]
    ("[fe|||]male", 10),                           # A1111 doctest: alternation with empty options
    ("[cow|horse] in a field", 5),                 # A1111 wiki, alternating words
    ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
     "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]", 100),  # A1111's worked example
    ("a cat [sitting:running:2] AND a dog:0.7 AND (snow:1.2):-0.5", 4),  # AND parts and their weights
    ("[((long)):" + LONG + ":4] end", 8),          # 1 chunk, then 2
    ("a [b:c:9] d", 10),                           # the last text starts after the last step: unused
    ("no editing (at:1.2) all", 5),
]


@pytest.fixture(scope="module")
def oracle():
    return OracleClip(transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB))


def _inspect(capsys, prompt: str, steps: int, *options: str) -> dict:
    assert main(["inspect", prompt, "--syntax", "a1111", "--steps", str(steps), "--json", *options]) == 0
    return json.loads(capsys.readouterr().out)


def _expected(prompt: str, steps: int) -> list[tuple[float, list[tuple]]]:
    """Per AND part: its weight and, for each text A1111 uses, the 0-based steps it is used
    at (the entry ``reconstruct_cond_batch`` picks at each step) as first, last, start and
    end fraction, and the text."""
    parts = []
    for text, weight in oracle_and_parts(prompt):
        schedule = oracle_schedule(text, steps)
        used: dict[int, list[int]] = {}
        for step in range(steps):
            used.setdefault(active_entry(schedule, step), []).append(step)
        entries = [(min(at), max(at), min(at) / steps, (max(at) + 1) / steps, schedule[index][1])
                   for index, at in sorted(used.items())]
        parts.append((weight, entries))
    return parts


def _got(report: dict) -> list[tuple[float, list[tuple]]]:
    return [(part["weight"], [(e["first_step"], e["last_step"], e["start_percent"], e["end_percent"], e["text"])
                              for e in part["entries"]]) for part in report["parts"]]


@pytest.mark.parametrize("prompt, steps", CASES)
def test_schedule_is_a1111s(capsys, oracle, prompt, steps):
    report = _inspect(capsys, prompt, steps)
    assert report["steps"] == steps
    got, expected = _got(report), _expected(prompt, steps)
    steps_and_texts = lambda parts: [(w, [(e[0], e[1], e[4]) for e in es]) for w, es in parts]  # noqa: E731
    assert steps_and_texts(got) == steps_and_texts(expected)
    percents = lambda parts: [x for _, es in parts for e in es for x in e[2:4]]  # noqa: E731
    assert percents(got) == pytest.approx(percents(expected))
    for part in report["parts"]:  # each text's chunks, as A1111 chunks that text
        for entry in part["entries"]:
            chunks = oracle.chunks(entry["text"])
            assert [c["num_tokens"] for c in entry["chunks"]] == \
                [c.ids.index(oracle.end_id) - 1 for c in chunks], entry["text"]


def test_wiki_examples_written_out(capsys):
    """A1111's wiki: ``a [fantasy:cyberpunk:16] landscape`` draws a fantasy landscape up to
    step 16 and a cyberpunk one after it; its parser's doctest gives ``a [b:3]`` over 10
    steps as ``[[3, 'a '], [10, 'a b']]`` (text up to and including its end step)."""
    assert _got(_inspect(capsys, "a [fantasy:cyberpunk:16] landscape", 100)) == [
        (1.0, [(0, 16, 0.0, 0.17, "a fantasy landscape"), (17, 99, 0.17, 1.0, "a cyberpunk landscape")])]
    assert _got(_inspect(capsys, "a [b:3]", 10)) == [(1.0, [(0, 3, 0.0, 0.4, "a "), (4, 9, 0.4, 1.0, "a b")])]


def test_table_lists_parts_ranges_texts_and_chunks(capsys):
    assert main(["inspect", "a [red:blue:2] fox AND a dog:0.5", "--syntax", "a1111", "--steps", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "schedule over 4 steps (0..3), 2 AND part(s)"
    assert lines[1] == "part 1: weight 1"
    assert lines[2] == "  steps 0..2  start_percent 0  end_percent 0.75  'a red fox'"
    assert lines[3].startswith("    chunk 0: 3 prompt token(s)")
    assert lines[4] == "  steps 3..3  start_percent 0.75  end_percent 1  'a blue fox'"
    assert "part 2: weight 0.5" in lines and "  steps 0..3  start_percent 0  end_percent 1  ' a dog'" in lines


def test_steps_mean_what_encode_scheduled_uses(capsys, tiny_model):
    """The ranges printed are those of the conditioning ``encode_scheduled(steps=N)`` returns."""
    from textenc.sd import load_clip

    clip = load_clip(tiny_model, device="cpu")
    for prompt, steps in CASES[2:8]:
        report = _inspect(capsys, prompt, steps, "--model", str(tiny_model))
        printed = [(e["start_percent"], e["end_percent"], part["weight"])
                   for part in report["parts"] for e in part["entries"]]
        conditioning = clip.encode_scheduled(prompt, steps=steps, syntax="a1111")
        assert printed == [(extra["start_percent"], extra["end_percent"], extra["strength"])
                           for _, extra in conditioning], prompt


@pytest.mark.parametrize("options, words", [
    ((), "--steps needs a syntax with prompt schedules (--syntax a1111); --syntax comfy has no prompt editing"),
    (("--syntax", "compel"), "--syntax compel has no prompt editing, alternation or AND"),
    (("--syntax", "a1111", "--steps", "0"), "argument --steps: must be at least 1, got 0"),
    (("--syntax", "a1111", "--steps", "ten"), "argument --steps: expected a whole number, got 'ten'"),
])
def test_steps_usage_errors_are_one_line_exit_2(capsys, options, words):
    argv = ["inspect", "a [b:c:2]", *options]
    if "--steps" not in options:
        argv += ["--steps", "4"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("textenc inspect: error: ") and words in captured.err
    assert captured.err.rstrip().endswith("see 'textenc inspect --help'")


def test_scheduled_syntaxes_are_the_dialects_with_schedules():
    assert SCHEDULED_SYNTAXES == tuple(s for s in SYNTAXES if hasattr(get_dialect(s), "prompt_schedules"))


def test_steps_help_says_what_it_means(capsys):
    assert main(["inspect", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps N sampling steps, as steps= of CLIP.encode_scheduled" in text
    assert "needs --syntax a1111 (default: none" in text
