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
import tempfile
import time
from pathlib import Path

import pytest
import torch

from dataset_fixtures import ROOT, checkout_env, folder_bytes

pytestmark = pytest.mark.slow  # starts Ray clusters and dataset CLI processes

ray = pytest.importorskip("ray", reason="the ray engine needs the textenc[ray] extra")
if not Path("/proc/self/environ").exists():
    pytest.skip("finding Ray's processes needs Linux /proc", allow_module_level=True)

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
    """pid, parent, state, whether it carries a driver's reaper marker, and command line."""
    names = []
    for pid in pids:
        proc = Path(f"/proc/{pid}")
        try:
            fields = (proc / "stat").read_bytes().rsplit(b")", 1)[1].split()
            reaper = b"TEXTENC_RAY_RUN=" in (proc / "environ").read_bytes()
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
            names.append(f"{pid} (parent {int(fields[1])}, state {fields[0].decode()}, "
                         f"reaper marker {reaper}): {command}")
        except (OSError, IndexError):
            names.append(f"{pid} (gone)")
    return names


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
    return checkout_env(**{MARK: marker}, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", **extra)


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
        left = _wait_gone(marker, 30)
        described = _describe(left)  # before the clean-up below kills them
        written = sorted(out.glob("shard-*.safetensors"))
    finally:
        driver.kill()
        _kill_marked(marker)
    assert driver.returncode != 0
    assert _shards_in_manifest(out) < 60, "the run finished before it was interrupted"
    assert left == [], described
    time.sleep(2)
    assert sorted(out.glob("shard-*.safetensors")) == written  # no actor writes on


# ---- a real two-node cluster -------------------------------------------------------------

def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _node_options(*, head: bool) -> tuple[list[str], int]:
    """Ports of one node, all distinct (two nodes share this machine) → (options, GCS port)."""
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
    ports = _free_ports(len(names) + 6)
    options = [f"--{name}={port}" for name, port in zip(names, ports)]
    options.append("--worker-port-list=" + ",".join(map(str, ports[len(names):len(names) + 4])))
    if head:  # the dashboard is off, but its port must still not collide with another session's
        options += ["--head", f"--port={ports[-1]}", "--include-dashboard=false", f"--dashboard-port={ports[-2]}"]
    return options, ports[-1]


class TwoNodeCluster:
    """``ray start --head`` and ``ray start --address`` as two processes, 1 CPU each, each
    with its own temp dir and ports; stopped by killing what they started (never ``ray stop``)."""

    def __init__(self, marker: str, env: dict[str, str]) -> None:
        self.marker, self.env = marker, env
        self.folders = [Path(tempfile.mkdtemp(prefix="tray", dir="/tmp")) for _ in range(2)]
        self.processes: list[subprocess.Popen] = []
        self.address = ""

    def _start(self, folder: Path, options: list[str]) -> None:
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus=1",
                   f"--temp-dir={folder}", "--disable-usage-stats", *options]
        log = open(folder / "start.log", "wb")
        self.processes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        log.close()
        deadline = time.monotonic() + 90
        while b"Ray runtime started" not in (folder / "start.log").read_bytes():
            if self.processes[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start failed:\n" + (folder / "start.log").read_text()[-3000:])
            time.sleep(0.25)

    def start(self) -> "TwoNodeCluster":
        options, gcs_port = _node_options(head=True)
        self._start(self.folders[0], options)
        self.address = f"127.0.0.1:{gcs_port}"
        options, _ = _node_options(head=False)
        self._start(self.folders[1], [f"--address={self.address}", *options])
        return self

    def actor_nodes(self, class_name: str) -> list[int]:
        """How many ``class_name`` actors each node ran (from the worker logs)."""
        needle = f":actor_name:{class_name}".encode()
        return [sum(needle in log.read_bytes() for log in folder.glob("session_2*/logs/worker-*.out"))
                for folder in self.folders]

    def stop(self) -> list[int]:
        """Kill everything the two nodes started → pids still alive after 20 s (should be none)."""
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(30)
        _kill_marked(self.marker)  # workers run in process groups of their own
        left = _wait_gone(self.marker, 20)
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        return left


def _threads_option() -> list[str]:
    """``--threads 1`` where the CLI has it; otherwise the tests' OMP_NUM_THREADS=1 and the
    Ray engine's cores/workers (1 on 1-CPU nodes) give the same count."""
    import argparse

    from textenc.dataset.cli import configure_parser

    parser = configure_parser(argparse.ArgumentParser())
    return ["--threads", "1"] if "--threads" in parser._option_string_actions else []


def test_two_node_cluster_writes_the_local_engines_bytes(tmp_path, tiny_model):
    """With captions of the first shards repeated in the last ones, whose encodings go from
    one node's actor to the other's through Ray's object store (dedup across the run)."""
    from textenc.dataset import encode_dataset

    captions = _captions(tmp_path, 240)
    lines = captions.read_text().splitlines()
    captions.write_text("\n".join(lines[:200] + lines[:40]) + "\n")  # shards 10, 11 repeat shards 0, 1
    threads = _threads_option()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = encode_dataset(captions, model=tiny_model, out=tmp_path / "local", dtype="fp32",
                               shard_rows=20, progress=False,
                               **({"threads": 1} if threads else {}))
    finally:
        torch.set_num_threads(previous)
    marker = secrets.token_hex(8)
    # Ray 2.60's `ray start` turns token authentication on; the driver must use the same token.
    env = _env(marker, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    cluster = TwoNodeCluster(marker, env)
    try:
        cluster.start()
        done = subprocess.run(_cli(str(captions), "--model", str(tiny_model), "--out", str(tmp_path / "ray"),
                                   "--engine", "ray", "--ray-address", cluster.address, "--workers", "2",
                                   "--shard-rows", "20", *threads),
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        placed = cluster.actor_nodes("ShardWorker")
    finally:
        left = cluster.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert local.shards == 12 and "wrote 12 of 12 shards" in done.stdout
    assert local.reused == 40 and "240 encoded (40 reused from an identical caption)" in done.stdout
    assert placed == [1, 1]  # one actor on each node
    assert folder_bytes(tmp_path / "ray") == folder_bytes(tmp_path / "local")
    assert left == [], _describe(left)


def test_a_cluster_that_cannot_be_joined_is_a_dataset_error(monkeypatch):
    """Ray's ConnectionError (wrong address, or a token the driver lacks) becomes one line
    naming the address and the token setting."""
    from textenc.dataset.engines.ray import _init
    from textenc.errors import DatasetError

    def refuse(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.9:6379\nmore lines")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(DatasetError) as caught:
        _init(ray, "10.0.0.9:6379")
    message = str(caught.value)
    assert message.startswith("--ray-address 10.0.0.9:6379: cannot join the Ray cluster "
                              "(Failed to connect to Ray cluster at 10.0.0.9:6379)")
    assert "RAY_AUTH_MODE=token" in message and "\n" not in message
