"""Shards are reproducible by construction: their bytes depend on the rows, the model,
the options and the recorded compute settings (threads per process, batch size), never
on the engine, the number of Ray workers or the calling process's own torch threads.

This module pins no thread count: each test sets the count it means (1 and 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dataset_fixtures
from dataset_fixtures import encoder, folder_bytes, random_captions
from textenc.dataset import open_shards
from textenc.errors import DatasetError

ROWS, SHARD_ROWS = 480, 120


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    return random_captions(tmp_path_factory, ROWS, seed=1)[0]


_encode = encoder(dtype="fp32", shard_rows=SHARD_ROWS, batch_size=32)
_files = folder_bytes


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, captions, tiny_model):
    """Local runs at --threads 1 and 2, each started from a process holding the other count."""
    runs = {}
    for threads, ambient in ((1, 2), (2, 1)):
        previous = torch.get_num_threads()
        torch.set_num_threads(ambient)
        try:
            out = tmp_path_factory.mktemp(f"local{threads}")
            _encode(captions, tiny_model, out, threads=threads)
            assert torch.get_num_threads() == ambient  # restored afterwards
        finally:
            torch.set_num_threads(previous)
        runs[threads] = out
    return runs


@pytest.fixture
def ray_session():
    # One session per test: its 240 s deadlock guard then times one run, not the module's runs together.
    with dataset_fixtures.ray_session(240) as ray:
        yield ray


def test_the_thread_count_is_recorded(local_runs):
    for threads, out in local_runs.items():
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["compute"]["threads"] == threads
        assert manifest["compute"]["batch_size"] == 32


def test_the_calling_process_threads_do_not_change_the_bytes(tmp_path, local_runs, captions,
                                                             tiny_model):
    """--threads 1 from a 1-thread process equals --threads 1 from a 2-thread one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _encode(captions, tiny_model, tmp_path, threads=1)
    finally:
        torch.set_num_threads(previous)
    assert _files(tmp_path) == _files(local_runs[1])


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_local_equals_ray_byte_for_byte_at_equal_threads(tmp_path, ray_session, local_runs,
                                                         captions, tiny_model, threads):
    _encode(captions, tiny_model, tmp_path, engine="ray", workers=2, threads=threads)
    assert _files(tmp_path) == _files(local_runs[threads])


def test_default_local_run_equals_ray_at_other_threads_within_1e5(local_runs):
    """Different thread counts may round differently, by far less than 1e-5 (fp32)."""
    default = {i: (c, p) for i, c, p in open_shards(local_runs[1])}
    other = {i: (c, p) for i, c, p in open_shards(local_runs[2])}
    assert default.keys() == other.keys() and len(default) == ROWS
    worst = max(max((default[i][0] - other[i][0]).abs().max().item(),
                    (default[i][1] - other[i][1]).abs().max().item()) for i in default)
    assert worst <= 1e-5


def test_a_resume_with_other_compute_settings_is_refused(tmp_path, local_runs, captions, tiny_model):
    for name, data in _files(local_runs[1]).items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(DatasetError, match="threads"):
        _encode(captions, tiny_model, tmp_path, threads=2)
    with pytest.raises(DatasetError, match="batch_size"):
        _encode(captions, tiny_model, tmp_path, threads=1, batch_size=16)
    report = _encode(captions, tiny_model, tmp_path, threads=2, overwrite=True)
    assert report.shards_written == ROWS // SHARD_ROWS
    assert _files(tmp_path) == _files(local_runs[2])
