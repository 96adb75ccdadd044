"""encode-dataset reliability (issue 19 points 1-4, 6; issue 18 point 6): resume after a
kill at every write point, the reader's verification, ids that are not valid Unicode,
which temporary files a run may remove, the folder lock, caption-folder oddities."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from dataset_fixtures import ROOT, checkout_env, encoder, folder_bytes, write_tiny_sd1
from textenc.dataset import export_diffusers, export_kohya, open_shards
from textenc.dataset.format import clean_temp_files, temp_path
from textenc.dataset.lock import LOCK_NAME, FolderLock, this_host
from textenc.errors import DatasetError, DatasetIncompleteError, DatasetWarning

CAPTIONS = ["a photo of a cat", "a red house", "(a dog:1.2) in the sky", "",
            "an old woman smiling", "a city at night", "a river and a forest"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")
_encode = encoder(dtype="fp32", shard_rows=2, batch_size=4)
_files = folder_bytes


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer CLIP text encoder of width 64 in SD1 layout: half conftest's
    width, as the kill-point test loads it once per write point."""
    return write_tiny_sd1(tmp_path_factory.mktemp("model"), width=64)


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "captions.txt"
    path.write_bytes("\n".join(CAPTIONS).encode() + b"\n\xff not utf-8\n")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, captions, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("reference")
    _encode(captions, tiny_model, out)
    return out


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


# ---- point 1: resume from a kill at any write point ------------------------------------

@pytest.mark.slow
def test_a_kill_at_every_write_point_resumes_to_the_same_bytes(tmp_path, captions, tiny_model):
    script = ROOT / "tests" / "dataset_kill_points.py"
    env = checkout_env(OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script), str(captions), str(tiny_model), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    killed = [r for r in results if r["status"] == 99]
    # 4 shards, empty.safetensors and the manifest after each: dozens of write points.
    assert len(killed) >= 25 and results[-1]["status"] == 0, results
    failed = [r for r in results if not r.get("same")]
    assert failed == [], failed
    # The moment the issue names: empty.safetensors on disk, no shard yet. The manifest
    # is there already, so the resume above could continue from it.
    states = [set(r["left"]) - {LOCK_NAME} for r in killed]
    assert {"manifest.json", "empty.safetensors"} in states
    assert all("manifest.json" in state for state in states if state & {"empty.safetensors"})


# ---- point 2: open_shards verifies what it reads ---------------------------------------

def test_open_shards_refuses_a_flipped_data_byte(tmp_path, reference):
    out = _copy(reference, tmp_path / "out")
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # inside the pooled tensor: the header still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"shard-00001\.safetensors: its sha256 .* is not the manifest's"):
        list(open_shards(out))
    rows = list(open_shards(out, verify=False))  # the documented opt-out reads it as it is
    assert len(rows) == len(list(open_shards(reference)))


def test_open_shards_refuses_swapped_shard_files(tmp_path, reference):
    out = _copy(reference, tmp_path / "out")
    first, second = out / "shard-00000.safetensors", out / "shard-00001.safetensors"
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    with pytest.raises(DatasetError, match=r"shard-00000\.safetensors: its sha256"):
        list(open_shards(out))
    with pytest.raises(DatasetError, match=r"shard-00000\.safetensors: holds other rows than the "
                                           r"manifest lists for shard-00000"):
        list(open_shards(out, verify=False))


def test_open_shards_yields_the_rows_of_a_good_folder(reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    ids = [row_id for row_id, _, _ in open_shards(reference)]
    rejected = {entry["row"] for entry in manifest["rejected"]}
    assert ids == [row for row in range(len(CAPTIONS) + 1) if row not in rejected]
    assert rejected == {len(CAPTIONS)}  # the line that is not UTF-8


# ---- an unfinished folder: refused, or read with a warning when asked --------------------

class _Stopped(RuntimeError):
    """Raised from the shard hook: the run ends there, as a kill leaves it."""


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory, captions, tiny_model) -> Path:
    """A real run stopped after 2 of its 4 shards (8 input rows, 2 per shard)."""
    out = tmp_path_factory.mktemp("unfinished")
    written = []

    def stop_after_two(index: int) -> None:
        written.append(index)
        if len(written) == 2:
            raise _Stopped()

    with pytest.raises(_Stopped):
        _encode(captions, tiny_model, out, on_shard_written=stop_after_two)
    return out


def test_an_unfinished_folder_is_refused_saying_how_to_finish_it(tmp_path, unfinished):
    with pytest.raises(DatasetIncompleteError) as info:
        open_shards(unfinished)  # at the call, before any row is read
    message = str(info.value)
    assert isinstance(info.value, DatasetError) and str(unfinished) in message
    assert "2 of 4 shards are finished (covering 4 of 8 input rows)" in message
    assert "run the same encode-dataset command again to finish it" in message
    assert "allow_incomplete=True" in message
    for export in (export_diffusers, export_kohya):
        with pytest.raises(DatasetIncompleteError, match="2 of 4 shards are finished"):
            export(unfinished, tmp_path / export.__name__)
        assert not (tmp_path / export.__name__).exists()


def test_allow_incomplete_reads_the_finished_shards_and_warns(tmp_path, unfinished, reference):
    with pytest.warns(DatasetWarning, match=r"2 of 4 shards are finished .* reading only those") as caught:
        rows = list(open_shards(unfinished, allow_incomplete=True))
    assert caught[0].filename == __file__  # points at the caller's line
    expected = {row_id: pooled for row_id, _, pooled in open_shards(reference) if row_id < 4}
    assert [row_id for row_id, _, _ in rows] == sorted(expected) == [0, 1, 2, 3]
    assert all(torch.equal(pooled, expected[row_id]) for row_id, _, pooled in rows)
    for export in (export_diffusers, export_kohya):
        with pytest.warns(DatasetWarning, match="2 of 4 shards are finished"):
            assert export(unfinished, tmp_path / export.__name__, allow_incomplete=True) == 4


def test_a_finished_folder_gives_no_warning(tmp_path, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(open_shards(reference))) == len(CAPTIONS)
        assert export_diffusers(reference, tmp_path / "diffusers") == len(CAPTIONS)
        assert export_kohya(reference, tmp_path / "kohya") == len(CAPTIONS)


def test_running_the_same_command_again_finishes_the_folder(tmp_path, unfinished, captions, tiny_model,
                                                           reference):
    out = _copy(unfinished, tmp_path / "out")
    (out / LOCK_NAME).unlink(missing_ok=True)
    _encode(captions, tiny_model, out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _files(out) == _files(reference)
        assert len(list(open_shards(out))) == len(CAPTIONS)


# ---- point 3: ids and captions that are not valid Unicode -------------------------------

def test_lone_surrogate_ids_and_captions_are_rejected_rows(tmp_path, tiny_model):
    source = tmp_path / "captions.jsonl"
    lines = ['{"id": "ok-1", "text": "a cat"}',
             '{"id": "bad-\\ud800", "text": "a dog"}',  # a JSON escape of a lone surrogate
             '{"id": "bad-2\\udfff", "text": null}',  # rejected anyway; its id is still odd
             '{"id": "bad-caption", "text": "a house \\udc80 on a hill"}',
             '{"id": "ok-3", "text": "a tree"}']
    source.write_text("\n".join(lines) + "\n", encoding="ascii")
    for _ in range(2):  # and a re-run of the finished folder is fine too
        report = _encode(source, tiny_model, tmp_path / "out", id_column="id")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text("utf-8"))
    assert manifest["complete"] and report.encoded == 2
    reasons = {entry["row"]: entry["reason"] for entry in manifest["rejected"]}
    assert set(reasons) == {1, 2, 3}
    assert "id" in reasons[1] and "U+D800" in reasons[1]
    assert "caption" in reasons[3] and "U+DC80" in reasons[3]
    assert [entry["id"] for entry in manifest["rejected"]][0] == "bad-\ud800"  # kept, escaped in JSON
    assert [row_id for row_id, _, _ in open_shards(tmp_path / "out")] == ["ok-1", "ok-3"]


# ---- point 4: which temporary files a run removes ---------------------------------------

def test_cleanup_removes_only_temporary_files_of_dead_writers(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        host = this_host()
        names = {"notes.partial": True, "shard-00003.safetensors.partial": False,  # older versions
                 f"shard-00001.safetensors.textenc-{host}-{dead}.partial": False,
                 f"manifest.json.textenc-{host}-{dead}.partial": False,
                 f"shard-00002.safetensors.textenc-{host}-{sleeper.pid}.partial": True,  # live writer
                 f"photo.safetensors.textenc-{host}-{dead}.partial": True}  # not a dataset file
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        removed = clean_temp_files(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(removed) == sorted(name for name, kept in names.items() if not kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, kept in names.items() if kept)
    assert temp_path(tmp_path / "manifest.json").name == f"manifest.json.textenc-{host}-{os.getpid()}.partial"


def test_a_run_keeps_a_users_partial_file(tmp_path, captions, tiny_model, reference):
    (tmp_path / "notes.partial").write_text("mine")
    _encode(captions, tiny_model, tmp_path)
    assert (tmp_path / "notes.partial").read_text() == "mine"
    assert {k: v for k, v in _files(tmp_path).items() if k != "notes.partial"} == _files(reference)


# ---- issue 18 point 6: the folder lock ----------------------------------------------------

_HOLD = """
import sys, time
from textenc.dataset.lock import FolderLock
with FolderLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_a_held_folder_is_refused_at_once(tmp_path, captions, tiny_model):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=ROOT,
                              env=checkout_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(DatasetError) as caught:
            _encode(captions, tiny_model, tmp_path)
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    message = str(caught.value)
    assert f"pid {holder.pid} on host {this_host()}" in message and LOCK_NAME in message
    assert "another --out" in message and waited < 30  # refused, not queued behind it
    assert not list(tmp_path.glob("shard-*"))
    # The holder was killed (kill -9: its lock file stays) - the next run takes over.
    assert (tmp_path / LOCK_NAME).exists()
    _encode(captions, tiny_model, tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()
    assert open_shards(tmp_path) is not None and len(list(open_shards(tmp_path))) == len(CAPTIONS)


def test_the_lock_is_refused_within_one_process_and_released_after(tmp_path):
    with FolderLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == this_host()
        with pytest.raises(DatasetError, match=f"pid {os.getpid()}"):
            FolderLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    with FolderLock(tmp_path):
        pass


def test_a_stale_lock_file_without_flock_is_taken_over(tmp_path, monkeypatch):
    """Where flock is missing, the file decides: a dead pid on this host is stale, a live
    pid or another host is not."""
    import textenc.dataset.lock as lock_module

    monkeypatch.setattr(lock_module, "fcntl", None)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"pid": dead, "host": this_host(), "started": "then"}))
    with FolderLock(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    for holder in ({"pid": os.getppid(), "host": this_host()}, {"pid": dead, "host": "elsewhere"}):
        path.write_text(json.dumps(holder))
        with pytest.raises(DatasetError, match=f"pid {holder['pid']} on host {holder['host']}"):
            FolderLock(tmp_path).acquire()


# ---- point 6: caption folders --------------------------------------------------------

def test_caption_folder_skips_folders_special_files_and_outside_symlinks(tmp_path, tiny_model):
    from textenc.errors import TextencWarning

    folder = tmp_path / "captions"
    (folder / "x.txt").mkdir(parents=True)  # a directory named like a caption file
    (folder / "x.txt" / "inner.txt").write_text("a cat inside a folder")
    (folder / "a.txt").write_text("a red house")
    os.mkfifo(folder / "pipe.txt")  # reading it would block forever
    secret = tmp_path / "secret.txt"
    secret.write_text("not a caption of this folder")
    (folder / "leak.txt").symlink_to(secret)
    (folder / "alias.txt").symlink_to(folder / "a.txt")  # inside the folder: read
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "far.txt").write_text("far away")
    (folder / "linked_dir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.warns(TextencWarning) as warned:
        _encode(folder, tiny_model, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    skipped = {entry["path"]: entry["reason"] for entry in manifest["skipped_inputs"]}
    assert set(skipped) == {"x.txt", "pipe.txt", "leak.txt"}
    assert skipped["x.txt"] == "a directory, not a caption file"
    assert skipped["pipe.txt"].startswith("not a regular file")
    assert f"outside the caption folder {folder}" in skipped["leak.txt"]
    texts = [str(w.message) for w in warned if issubclass(w.category, TextencWarning)]
    assert sorted(text.split(":")[0] for text in texts) == sorted(
        str(folder / name) for name in skipped)
    got = {row_id: pooled for row_id, _, pooled in open_shards(tmp_path / "out")}
    assert sorted(got) == ["a", "alias", "x.txt/inner"]  # no leak, no far-away file
    assert torch.equal(got["a"], got["alias"])
