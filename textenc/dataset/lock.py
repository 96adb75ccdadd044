"""One run per output folder: the folder lock, and who is writing which file.

:class:`FolderLock` holds ``encode-dataset.lock`` in an output folder for the
length of a run. The file names its holder (pid, host, start time) and is held
with ``fcntl.flock``, which the operating system releases when the holder
exits, however it exits (``kill -9`` included): a second run on the folder is
refused at once while the holder lives, and takes the lock over once it is
gone. Where ``flock`` is not available (Windows, some network file systems)
the file's contents decide: a lock whose pid is dead on this host is taken
over, any other is refused.

:func:`writer_tag` / :func:`writer_alive` name the process that writes a
temporary file, so stale-temp cleanup removes only files no live process writes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import DatasetError

try:  # POSIX only; elsewhere the lock file's contents are all there is
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "FolderLock", "this_host", "pid_alive", "writer_tag", "writer_alive"]

LOCK_NAME = "encode-dataset.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def this_host() -> str:
    """This machine's name, reduced to ``[A-Za-z0-9_]`` so it can sit inside a file name."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "localhost"


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this machine (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    try:  # Linux: a killed child nobody reaped yet is a zombie, not a writer
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def writer_tag() -> str:
    """``host-pid`` of this process: the identity put into its temporary file names."""
    return f"{this_host()}-{os.getpid()}"


def writer_alive(tag: str) -> bool:
    """Whether the writer named by :func:`writer_tag` ``tag`` may still be running.

    A writer on this host is alive while its pid is; one on another host cannot
    be checked and counts as gone: only the holder of the folder lock cleans
    up, and no other run's writer can live while it holds the lock.
    """
    host, _, pid = tag.rpartition("-")
    return host == this_host() and pid.isdigit() and pid_alive(int(pid))


def _holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another run"
    return (f"another run (pid {holder.get('pid')} on host {holder.get('host')}, "
            f"started {holder.get('started')})")


class FolderLock:
    """Hold ``folder/encode-dataset.lock`` while a run writes ``folder``.

    >>> # with FolderLock(out):
    >>> #     ... write shards and the manifest ...

    Raises:
        DatasetError: another live run holds the folder (the message names its
            pid, host and start time and the lock file).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _refuse(self, holder: dict[str, Any]) -> DatasetError:
        return DatasetError(f"{self.path.parent} is being written by {_describe(holder)}; wait for "
                            f"it to finish or choose another --out (lock file {self.path})")

    def acquire(self) -> None:
        """Take the lock, or raise DatasetError at once if a live run holds it."""
        for _ in range(10):  # retried only when the holder removes the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                held = self._try_flock(fd)
                if held and os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self._fd = fd
                    self._write_holder()
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if not held:
                raise self._refuse(_holder(self.path))
        raise self._refuse(_holder(self.path))

    def _try_flock(self, fd: int) -> bool:
        """flock the file → False when another process holds it."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
        holder = _holder(self.path)  # no flock here: only a holder dead on this host is stale
        pid = holder.get("pid")
        if not holder:
            return True
        return holder.get("host") == this_host() and isinstance(pid, int) and not pid_alive(pid)

    def _write_holder(self) -> None:
        holder = {"pid": os.getpid(), "host": this_host(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        data = (json.dumps(holder) + "\n").encode("ascii")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Remove the lock file and let it go (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held, so no one locks a removed file
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
