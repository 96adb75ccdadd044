"""Kill ``encode_dataset`` at each of its file-system write points in turn, resume, compare.

Used by ``tests/test_dataset_reliability.py`` in a fresh interpreter (it forks):

    python tests/dataset_kill_points.py CAPTIONS MODEL WORKDIR

A write point is every call that changes the output folder: ``os.mkdir``,
``os.fsync`` (a temporary file is complete but not yet renamed; the file is
first cut to half its length, as a kill in the middle of writing would leave
it), ``os.replace`` (just renamed, the folder not yet synced) and ``os.unlink``.
For N = 1, 2, ... a forked child runs the encoding and exits with status 99
(like ``kill -9``: no ``finally``, no ``atexit``) at write point N; the parent
then re-runs the same encoding in the same folder and compares every file
with an uninterrupted run. It stops at the first N the child finishes
before reaching, and prints one JSON list with a result per N.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import torch

from dataset_fixtures import folder_bytes  # this script's folder comes first on sys.path

KILLED = 99


def install_kill_point(point: int) -> None:
    """Make the ``point``-th write of this process end it on the spot."""
    count = [0]
    real = {name: getattr(os, name) for name in ("mkdir", "fsync", "replace", "unlink")}

    def reached(fd: int | None = None) -> None:
        count[0] += 1
        if count[0] != point:
            return
        if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
        os._exit(KILLED)

    def fsync(fd):
        reached(fd)
        real["fsync"](fd)

    def after(name):
        def call(*args, **kwargs):
            result = real[name](*args, **kwargs)
            reached()
            return result
        return call

    os.fsync = fsync
    for name in ("mkdir", "replace", "unlink"):
        setattr(os, name, after(name))


def main(captions: str, model: str, workdir: str) -> list[dict]:
    from textenc.dataset import encode_dataset

    options = dict(model=model, dtype="fp32", shard_rows=2, batch_size=4, progress=False)
    work = Path(workdir)
    encode_dataset(captions, out=work / "reference", **options)
    reference = folder_bytes(work / "reference")
    results, point = [], 1
    while True:
        out = work / f"killed-at-{point}"
        pid = os.fork()
        if pid == 0:  # the child: encode until the kill point
            install_kill_point(point)
            try:
                encode_dataset(captions, out=out, **options)
            except BaseException:  # noqa: BLE001 - reported to the parent as status 1
                os._exit(1)
            os._exit(0)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        left = sorted(p.name for p in out.iterdir()) if out.exists() else []
        result = {"point": point, "status": status, "left": left}
        try:
            encode_dataset(captions, out=out, **options)
            result["same"] = folder_bytes(out) == reference
        except Exception as exc:  # noqa: BLE001 - the test prints what went wrong
            result["error"] = f"{type(exc).__name__}: {exc}"
        results.append(result)
        if status != KILLED:
            return results
        point += 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    for item in main(*sys.argv[1:4]):
        print(json.dumps(item))
