"""Interrupting ``python -m textenc.dataset`` (a real subprocess) with SIGINT or SIGTERM:
one line saying how many shards are finished and that re-running resumes, exit status
130 / 143, no traceback, no partial file under a final name, and the re-run ends
byte-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dataset_fixtures import checkout_env, folder_bytes, random_captions
from textenc.dataset import encode_dataset

ROWS, SHARD_ROWS = 3000, 100


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    return random_captions(tmp_path_factory, ROWS, seed=6)[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, captions, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("reference")
    previous = torch.get_num_threads()
    try:
        encode_dataset(captions, model=tiny_model, out=out, shard_rows=SHARD_ROWS, progress=False)
    finally:
        torch.set_num_threads(previous)
    return out


def _command(captions: Path, model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "textenc.dataset", str(captions), "--model", str(model),
            "--out", str(out), "--shard-rows", str(SHARD_ROWS), "--no-progress"]


def _finished(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("signum,status,words", [(signal.SIGINT, 130, "interrupted (SIGINT); "),
                                                (signal.SIGTERM, 143, "terminated (SIGTERM); ")])
def test_interrupt_is_one_line_and_the_rerun_resumes(tmp_path, captions, tiny_model, reference,
                                                    signum, status, words):
    out = tmp_path / "out"
    process = subprocess.Popen(_command(captions, tiny_model, out), env=checkout_env(), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while _finished(out) < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    # Worded as every textenc command words it (textenc.commands.common.run_command).
    assert lines[0].startswith(f"python -m textenc.dataset: {words}")
    assert "run the same command again to resume" in lines[0]
    manifest = json.loads((out / "manifest.json").read_text())
    done = len(manifest["shards"])
    assert 1 <= done < ROWS // SHARD_ROWS
    assert f"{done} of {ROWS // SHARD_ROWS} shards are finished" in lines[0]
    listed = {record["file"]: record["sha256"] for record in manifest["shards"]}
    for path in out.glob("shard-*.safetensors"):  # no partial file under a final name
        assert path.name in listed and hashlib.sha256(path.read_bytes()).hexdigest() in listed[path.name]
    rerun = subprocess.run(_command(captions, tiny_model, out), env=checkout_env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({done} skipped)" in rerun.stdout
    assert folder_bytes(out) == folder_bytes(reference)
