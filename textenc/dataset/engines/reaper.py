"""Stop the Ray processes a driver started, even when the driver is killed (``kill -9``).

``ray.init`` ties ``gcs_server`` and ``raylet`` to the driver's life, but the
agents and workers the raylet starts outlive a killed driver. So before a run
starts Ray itself, :class:`RayReaper` starts a small watchdog process and puts a
random marker in the driver's environment for the length of ``ray.init``: every
Ray process started then inherits it (the raylet passes its environment on to
the workers it starts later). Ray's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) overwrite their environment block with their process
title, so the watchdog also remembers, once a second while the driver lives,
every descendant of a marked process (pid and start time). When the pipe from
the driver closes - the driver finished, raised, or died - it kills all of them,
sweeping again until two sweeps in a row find none (a process Ray was starting
just then shows up late). Linux only (it reads ``/proc``); elsewhere it does
nothing and Ray's own shutdown is all.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Iterator

__all__ = ["RayReaper", "MARKER_VARIABLE"]

MARKER_VARIABLE = "TEXTENC_RAY_RUN"

# Runs in its own interpreter (imports nothing from textenc, starts in a blink).
_WATCHDOG = r"""
import os, select, signal, sys, time
from pathlib import Path
needle, driver, me = sys.argv[1].encode(), int(sys.argv[2]), os.getpid()

def table():
    # pid -> (parent, start time, marked) of every live process but the driver and this one
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (driver, me):
            continue
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
            if fields[0] == b"Z":
                continue
            marked = needle in (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        found[int(entry.name)] = (int(fields[1]), fields[19], marked)
    return found

def remember(procs, known):
    # marked processes and their descendants (Ray's agents rewrite their environment
    # block with their process title, so only their parent names them), by start time
    ours = {pid for pid, (_, _, marked) in procs.items() if marked}
    while True:
        more = {pid for pid, (parent, _, _) in procs.items() if parent in ours and pid not in ours}
        if not more:
            break
        ours |= more
    known.update((pid, procs[pid][1]) for pid in ours)

known = {}
while True:  # until the driver closes the pipe or dies; look at the process tree each second
    if select.select([sys.stdin], [], [], 1.0)[0] and not os.read(sys.stdin.fileno(), 4096):
        break
    remember(table(), known)
# Kill what is ours; sweep again until two sweeps in a row find nothing (30 s at most):
# a process Ray was starting while the driver died shows up late.
deadline, quiet = time.monotonic() + 30, 0
while quiet < 2 and time.monotonic() < deadline:
    procs = table()
    remember(procs, known)
    victims = [pid for pid, start in known.items() if pid in procs and procs[pid][1] == start]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    quiet = 0 if victims else quiet + 1
    time.sleep(0.2)
"""


class RayReaper:
    """A watchdog that kills the Ray processes started inside :meth:`marking`.

    >>> # reaper = RayReaper()
    >>> # with reaper.marking():
    >>> #     ray.init(...)
    >>> # ...
    >>> # ray.shutdown(); reaper.close()
    """

    def __init__(self) -> None:
        self.marker = f"{MARKER_VARIABLE}={os.getpid()}-{secrets.token_hex(8)}"
        self._process: subprocess.Popen | None = None
        if Path("/proc/self/environ").exists():
            self._process = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, self.marker, str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # a Ctrl-C to the terminal does not stop it first

    @contextlib.contextmanager
    def marking(self) -> Iterator[None]:
        """Processes started inside this block carry the marker (the driver's own
        environment is restored after it)."""
        name, value = self.marker.split("=", 1)
        previous = os.environ.get(name)
        os.environ[name] = value
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous

    def close(self, *, timeout: float = 10.0) -> None:
        """Let the watchdog kill what is left of the marked processes, and wait for it."""
        if self._process is None:
            return
        process, self._process = self._process, None
        process.stdin.close()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:  # it is done soon; the run's result does not wait
            pass
