"""The Ray engine outside one process: a driver killed mid-run leaves no Ray process
behind (issue 18 point 6), and a real two-node cluster started with ``ray start``
writes the local engine's bytes (issue 18 point 5).

Every Ray process these tests start carries a random marker in its environment
(Ray's processes inherit it from the driver or from ``ray start``); the tests find
them by that marker in ``/proc/*/environ``, stop them by pid, and never touch
another session's processes (no ``ray stop``).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ray = pytest.importorskip("ray", reason="the ray engine needs the textenc[ray] extra")
if not Path("/proc/self/environ").exists():
    pytest.skip("finding Ray's processes needs Linux /proc", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
MARK = "TEXTENC_TEST_RAY_SESSION"
WORDS = "a photo of the cat dog red blue house tree sky sun moon old woman man city night".split()


def _marked(marker: str) -> list[int]:
    """Live (not zombie) processes whose environment holds ``MARK=marker``."""
    needle = f"{MARK}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if state != b"Z":
            found.append(int(entry.name))
    return found


def _kill_marked(marker: str) -> None:
    for pid in _marked(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_gone(marker: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _describe(pids: list[int]) -> list[str]:
    names = []
    for pid in pids:
        try:
            names.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                         .decode(errors="replace")[:120])
        except OSError:
            names.append(str(pid))
    return names


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer CLIP text encoder (width 128) in SD1 layout."""
    transformers = pytest.importorskip("transformers")
    from textenc.convert import to_layout

    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=49408,
                                         max_position_embeddings=77, projection_dim=128,
                                         hidden_act="quick_gelu")
    model = transformers.CLIPTextModelWithProjection._from_config(config, attn_implementation="sdpa")
    state = to_layout(dict(model.state_dict()), "sd1")
    path = tmp_path_factory.mktemp("model") / "tiny_sd1.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path))
    return path


def _captions(folder: Path, count: int, *, long: bool = False) -> Path:
    rng = random.Random(count)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120) if long else rng.randint(3, 20)))
             for _ in range(count)]
    path = folder / f"captions-{count}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "textenc.dataset", *args, "--dtype", "fp32", "--no-progress"]


def _env(marker: str, **extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), **{MARK: marker}, RAY_USAGE_STATS_ENABLED="0",
                OMP_NUM_THREADS="1", **extra)


def _shards_in_manifest(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


# ---- the driver dies: its actors and Ray processes go too ----------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["TERM", "INT", "KILL"])
def test_killing_the_driver_stops_its_ray_processes(tmp_path, tiny_model, signum):
    captions = _captions(tmp_path, 3000, long=True)
    out, marker = tmp_path / "out", secrets.token_hex(8)
    driver = subprocess.Popen(_cli(str(captions), "--model", str(tiny_model), "--out", str(out),
                                   "--engine", "ray", "--workers", "2", "--shard-rows", "50"),
                              cwd=ROOT, env=_env(marker), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while _shards_in_manifest(out) < 1 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, driver.communicate()[1].decode()[-2000:]
        assert _shards_in_manifest(out) >= 1, "no shard was written in 240 s"
        assert len(_marked(marker)) > 3  # Ray's own processes and the actors are running
        driver.send_signal(signum)
        driver.communicate(timeout=60)
        written = sorted(out.glob("shard-*.safetensors"))
        left = _wait_gone(marker, 30)
    finally:
        driver.kill()
        _kill_marked(marker)
    assert driver.returncode != 0
    assert _shards_in_manifest(out) < 60, "the run finished before it was interrupted"
    assert left == [], _describe(left)
    time.sleep(2)
    assert sorted(out.glob("shard-*.safetensors")) == written  # no actor writes on
