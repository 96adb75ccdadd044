"""``textenc inspect`` summarises a long prompt unless ``--full`` (issue 28, point 6).

A 5,000-word prompt printed 248 KB, one ``units:`` line of 35 KB. Now a prompt of
more than 2 windows or 20 units, or with a unit text of over 200 characters, prints a
``summary:`` line of counts, its first and last window and its first and last 10
units (texts cut to 60 characters); ``--full`` prints the whole table, and
``--json`` is always whole. Counts are checked against the tokenizer's own windows.
"""

from __future__ import annotations

import json

import pytest

from textenc.cli import main
from textenc.commands.inspect import format_report
from textenc.prompts.tokenizer import SDTokenizer

WORDS = ", ".join(f"word{i} (detail{i}:1.1)" for i in range(400))  # 47 windows, 800 units
SHORT = "a (red:1.2) cat, [blue] sky"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["inspect", *argv])
    printed = capsys.readouterr()
    return status, printed.out, printed.err


def test_a_long_prompt_is_summarised(capsys):
    windows = SDTokenizer().tokenize_with_weights(WORDS, return_word_ids=True)
    tokens = sum(1 for window in windows for token in window if token[2])
    status, out, _ = run(capsys, WORDS)
    lines = out.splitlines()
    assert status == 0
    assert lines[0] == (f"summary: {len(windows)} window(s), {tokens} prompt token(s), 800 unit(s); a summary "
                        "(--full prints every one)")
    headers = [line for line in lines if line.startswith("window ")]
    assert headers[0].startswith("window 0: 77 tokens") and headers[1].startswith(f"window {len(windows) - 1}: ")
    assert len(headers) == 2
    assert f"... windows 1..{len(windows) - 2} not shown" in lines
    assert "  ... 780 unit(s) not shown" in lines
    units = [line for line in lines if line.startswith("  word ")]
    assert len(units) == 20 and units[0].endswith("'word0 '") and units[-1].endswith("'detail399'")
    assert len(out) < 10_000


def test_full_prints_the_whole_table(capsys):
    report = SDTokenizer().inspect(WORDS)
    status, out, _ = run(capsys, "--full", WORDS)
    assert status == 0
    assert out == format_report(report) + "\n"
    assert sum(line.startswith("window ") for line in out.splitlines()) == len(report.windows)


def test_json_is_always_whole(capsys):
    report = SDTokenizer().inspect(WORDS)
    status, out, _ = run(capsys, "--json", WORDS)
    data = json.loads(out)
    assert status == 0 and len(data["windows"]) == len(report.windows) and len(data["units"]) == 800
    assert data["dropped_tokens"] == 0


def test_a_short_prompt_prints_as_before(capsys):
    status, out, _ = run(capsys, SHORT)
    assert status == 0
    assert out == format_report(SDTokenizer().inspect(SHORT)) + "\n"
    assert run(capsys, "--full", SHORT)[1] == out


def test_one_long_unit_is_cut(capsys):
    """compel keeps one window, but its one unit holds the whole text."""
    status, out, err = run(capsys, "--syntax", "compel", WORDS)
    lines = out.splitlines()
    assert "warning: syntax='compel' dropped" in err
    assert status == 0 and lines[0].startswith("summary: 1 window(s), 75 prompt token(s), 1 unit(s)")
    (unit,) = [line for line in lines if line.startswith("  word ")]
    with pytest.warns(UserWarning, match="dropped"):
        text = SDTokenizer().inspect(WORDS, syntax="compel").units[0].text
    assert unit.endswith(f"{text[:60]!r} ... ({len(text)} characters)")
    assert [line for line in lines if line.startswith("truncated: ")]


def test_help_names_the_option(capsys):
    assert main(["inspect", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--full print every window, token and unit of a long prompt" in text
    assert "--json always prints everything" in text
