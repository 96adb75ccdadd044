"""``bench/run.py`` rewrites the tracked bench/RESULTS.md only when asked, on a full run.

The sections are replaced by none (so nothing is timed here) and RESULTS by a
temporary file; the rest of ``main`` runs as it does for real.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture()
def bench_run(monkeypatch, tmp_path):
    import torch

    threads = torch.get_num_threads()  # main() sets them for the whole process
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_run_under_test", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SECTIONS", [])
    monkeypatch.setattr(module, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(module, "BENCH_DIR", tmp_path / "bench")
    yield module
    torch.set_num_threads(threads)


def test_quick_and_plain_runs_print_only(bench_run, capsys):
    for argv in (["--quick"], [], ["--only", "bench_forward"]):
        assert bench_run.main(argv) == 0
        assert "== all targets" in capsys.readouterr().out
        assert not bench_run.RESULTS.exists()


def test_write_rewrites_results_on_a_full_run(bench_run, capsys):
    assert bench_run.main(["--write"]) == 0
    text = bench_run.RESULTS.read_text()
    assert "* **Command:** `python bench/run.py --write`" in text and "8 GPU forward" in text
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--quick", "--write"], ["--only", "bench_forward", "--write"]])
def test_write_is_refused_for_short_runs(bench_run, capsys, argv):
    with pytest.raises(SystemExit) as done:
        bench_run.main(argv)
    assert done.value.code == 2
    assert "--write rewrites bench/RESULTS.md from a full run only" in capsys.readouterr().err
    assert not bench_run.RESULTS.exists()
