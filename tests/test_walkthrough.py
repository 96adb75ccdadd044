"""docs/walkthrough.md runs as written, and prints what it shows (issue 28).

The walk-through is read in order: each ```python block is run (one namespace, in
an empty folder, so its set-up step makes the tiny model the later steps use) and
what it prints must equal the ```text block right after it, if any; each ``$ ...``
line of a ```console block is run as a new process (``textenc`` as
``python -m textenc``) and its stderr then stdout lines must equal the lines after
it, ``…`` standing for any text (a speed). A line ending in ``error: ...`` expects a
non-zero exit status, anything else zero. The README's contents link to it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from textenc.loading.paths import set_models_dir

ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)


def steps() -> list[tuple[str, str, list[str] | None]]:
    """``("python", code, printed lines or None)`` and ``("console", command, lines)``, in order."""
    found: list[tuple[str, str, list[str] | None]] = []
    for kind, body in _FENCE.findall(WALKTHROUGH.read_text("utf-8")):
        if kind == "python":
            found.append(("python", body, None))
        elif kind == "text" and found and found[-1][0] == "python" and found[-1][2] is None:
            found[-1] = ("python", found[-1][1], body.splitlines())
        elif kind == "console":
            for session in re.split(r"^(?=\$ )", body, flags=re.M):
                if session.strip():
                    command, *lines = session.splitlines()
                    found.append(("console", command[2:], lines))
    return found


def _matches(expected: list[str], printed: list[str]) -> bool:
    patterns = [re.compile(".*".join(map(re.escape, line.split("…"))) + r"\Z") for line in expected]
    return len(patterns) == len(printed) and all(p.match(line) for p, line in zip(patterns, printed))


def _run_command(command: str, cwd: Path) -> tuple[int, list[str]]:
    argv = shlex.split(command)
    assert argv[0] == "textenc", command
    paths = [str(ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    result = subprocess.run([sys.executable, "-m", "textenc", *argv[1:]], cwd=cwd, capture_output=True,
                            text=True, env=env, timeout=300)
    return result.returncode, result.stderr.splitlines() + result.stdout.splitlines()


def test_the_readme_links_the_walkthrough():
    assert "(docs/walkthrough.md)" in (ROOT / "README.md").read_text("utf-8")


def test_the_walkthrough_covers_every_entry_point():
    kinds = steps()
    code = "\n".join(body for kind, body, _ in kinds if kind == "python")
    commands = [body.split()[1] for kind, body, _ in kinds if kind == "console"]
    assert {"inspect", "encode", "encode-dataset"} <= set(commands)
    assert "textenc.sd" in code and "textenc.dataset" in code and "textenc_nodes" in code


@pytest.mark.slow
def test_every_step_runs_and_prints_what_it_shows(tmp_path, monkeypatch):
    pytest.importorskip("textenc_nodes")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "walkthrough"}
    try:
        _run_steps(namespace, tmp_path)
    finally:
        set_models_dir(None)  # the nodes step sets it; never leave it set for other tests


def _run_steps(namespace: dict, tmp_path: Path) -> None:
    for number, (kind, body, expected) in enumerate(steps(), 1):
        if kind == "python":
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(body, f"walkthrough step {number}", "exec"), namespace)
            if expected is not None:
                assert printed.getvalue().splitlines() == expected, f"step {number}:\n{body}"
            continue
        status, lines = _run_command(body, tmp_path)
        failing = any(re.search(r"error: ", line) for line in expected)
        assert (status != 0) == failing, f"step {number}: {body} exited {status}:\n" + "\n".join(lines)
        assert _matches(expected, lines), f"step {number}: {body}\nprinted:\n" + "\n".join(lines)
