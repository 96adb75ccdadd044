"""The documentation's ``textenc inspect`` examples are what the command prints today.

Each fenced block of README.md and docs/*.md (most live in docs/command-line.md)
that starts with ``$ textenc inspect`` is run with
``textenc.cli.main`` in a folder holding ``emb/my_style.safetensors`` (two 768-wide
vectors, as the example's embedding), and its printed lines (warnings on stderr
first, as a terminal shows them) must equal the block's. The documented absolute path
of that file is the one on the machine it was captured on; it is compared as that
file's path here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from textenc.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"```\n(\$ textenc inspect .*?)```", re.S)
_EMBEDDING_PATH = re.compile(r"\(/\S*/emb/my_style\.safetensors\)")


def _examples() -> list[tuple[str, list[str]]]:
    """``(command, printed lines)`` for each ``$ textenc inspect`` line of those blocks."""
    examples = []
    for document in DOCUMENTS:
        for block in _BLOCK.findall(document.read_text("utf-8")):
            for session in re.split(r"^(?=\$ )", block, flags=re.M):
                if session:
                    command, *lines = session.splitlines()
                    examples.append((command, lines))
    return examples


def test_the_readme_has_inspect_examples():
    """Counted across README.md and docs/*.md, so moving an example between them keeps it."""
    assert len(_examples()) >= 4


@pytest.mark.parametrize("command, expected", _examples(), ids=lambda v: v if isinstance(v, str) else "")
def test_inspect_example_prints_what_the_readme_shows(command, expected, tmp_path, monkeypatch, capsys):
    (tmp_path / "emb").mkdir()
    save_file({"emb_params": torch.full((2, 768), 0.01)}, str(tmp_path / "emb" / "my_style.safetensors"))
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)[2:]  # after "$ textenc"
    assert argv[0] == "inspect"
    try:
        status = main(argv)
    except SystemExit as stop:  # a usage error, as the shell shows it
        status = stop.code
    failed = any(line.startswith("textenc inspect: error:") for line in expected)
    assert (status != 0) == failed
    printed = capsys.readouterr()
    here = f"({tmp_path / 'emb' / 'my_style.safetensors'})"
    lines = printed.err.splitlines() + printed.out.splitlines()
    assert lines == [_EMBEDDING_PATH.sub(lambda _: here, line) for line in expected]
