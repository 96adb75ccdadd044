"""The ``ray`` engine of :func:`textenc.dataset.encode_dataset` (extra ``textenc[ray]``).

Shards are handed out one at a time to ``workers`` actors; each actor loads
the model once and writes its shards itself with the same code as the local
engine (:func:`textenc.dataset.pipeline.run_shards`), so the files do not
depend on the engine or the worker count. The driver alone writes the manifest.

Actors ask for ``num_cpus=0.5``: on a 2-CPU machine, actors holding whole CPUs
leave none for Ray's own tasks and the job hangs without an error. Each actor
sets the run's torch thread count (``threads``, recorded in the manifest)
itself, the same count the local engine uses, so both write the same bytes.
Actors are placed with the ``SPREAD`` strategy, so a cluster's nodes share the work.

Lifecycle: however the driver's run ends (finished, an error, Ctrl-C, SIGTERM,
which ``ray.init`` turns into ``SystemExit``), its actors are killed and a Ray
it started is shut down; if the driver is killed outright, the watchdog of
:mod:`textenc.dataset.engines.reaper` stops the Ray processes it started.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any, Callable, Sequence

import torch

from ...errors import DatasetError, TextencError
from ...warn import missing_embedding_policy
from ..encode import CaptionEncoder, EncodeSettings
from ..inputs import CaptionRows
from ..manifest import record_shard
from ..model import cast_for_compute, load_model, model_fingerprint, resolve_device
from ..pipeline import ShardContext, ShardJob, run_shards
from .reaper import RayReaper

__all__ = ["run_ray", "ACTOR_NUM_CPUS"]

ACTOR_NUM_CPUS = 0.5
_WAIT_SECONDS = 1.0  # ray.wait polls, so signals (timeouts, Ctrl-C) reach the driver


def _require_ray():
    try:
        import ray
    except ImportError as exc:
        raise DatasetError("--engine ray needs Ray: pip install 'textenc[ray]'") from exc
    return ray


class _OffsetList:
    """``data[i - offset]`` for absolute row indices: ships one shard's rows only."""

    def __init__(self, data: Sequence, offset: int) -> None:
        self.data, self.offset = list(data), offset

    def __getitem__(self, index: int):
        return self.data[index - self.offset]


def _shard_rows(rows: CaptionRows, job: ShardJob) -> CaptionRows:
    rejected = {r: reason for r, reason in rows.rejected.items() if job.start <= r < job.stop}
    return CaptionRows(_OffsetList(rows.ids[job.start:job.stop], job.start),  # type: ignore[arg-type]
                       _OffsetList(rows.texts[job.start:job.stop], job.start),  # type: ignore[arg-type]
                       rejected)


class ShardWorker:
    """One actor: a loaded model that encodes and writes whole shards."""

    def __init__(self, *, model: str, kind: str, device: str | None, settings: EncodeSettings,
                 context: ShardContext, folder: str, batch_size: int, threads: int,
                 on_missing_embedding: str = "warn") -> None:
        torch.set_num_threads(threads)
        clip = load_model(model, kind=kind, device=resolve_device(device), embeddings=settings.embeddings)
        self.on_missing_embedding = on_missing_embedding
        if model_fingerprint(clip) != context.fingerprint:
            raise DatasetError(f"{model} changed while the dataset was being encoded")
        cast_for_compute(clip, settings.compute_dtype)
        self.encoder = CaptionEncoder(clip, settings)
        self.context, self.folder, self.batch_size = context, folder, batch_size

    def encode(self, job: ShardJob, rows: CaptionRows) -> tuple[dict, dict[str, float]]:
        """Encode and write one shard → ``(manifest record, seconds spent per stage)``."""
        self.encoder.seconds = dict.fromkeys(self.encoder.seconds, 0.0)
        with missing_embedding_policy(self.on_missing_embedding):  # the driver's filter is not in this process
            records = list(run_shards(self.encoder, rows, [job], folder=self.folder,
                                      context=self.context, batch_size=self.batch_size))
        return records[0], dict(self.encoder.seconds)


def _join(ray, address: str) -> None:
    try:
        ray.init(address=address, logging_level=_ray_log_level())
    except ConnectionError as exc:  # Ray's message runs to many lines; its first says what failed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatasetError(
            f"--ray-address {address}: cannot join the Ray cluster ({first}); check the address "
            "('ray status' on the head node prints it) and, if the cluster uses token "
            "authentication (Ray 2.60's ray start turns it on when ~/.ray/auth_token exists), "
            "run with RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN or "
            "~/.ray/auth_token)") from exc


def _ray_log_level() -> int:
    """Ray's own INFO and WARNING lines only when textenc's logger is at INFO (``--verbose``,
    or a program that configured logging so); errors always."""
    return logging.INFO if logging.getLogger("textenc").isEnabledFor(logging.INFO) else logging.ERROR


def _init(ray, address: str | None) -> tuple[bool, RayReaper | None]:
    """Connect to Ray → ``(started here, reaper)``: True when this call started Ray (and
    must shut it down), with the reaper watching the processes it started."""
    if ray.is_initialized():
        return False, None
    if address:
        _join(ray, address)
        return True, None
    reaper = RayReaper()
    try:
        with reaper.marking():  # the processes Ray starts now are the reaper's to stop
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=_ray_log_level())
    except BaseException:
        reaper.close()
        raise
    return True, reaper


def _collect(ray, pending: dict, run: Any, records: dict, seconds: dict,
             on_shard_written: Callable[[int], None] | None) -> list:
    """Wait for finished shards, record them → the actors that are free again."""
    done, _ = ray.wait(list(pending), num_returns=1, timeout=_WAIT_SECONDS)
    free = []
    for ref in done:
        actor, job = pending.pop(ref)
        try:
            record, spent = ray.get(ref)
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, TextencError):  # a fault of the input, said as the local engine says it
                raise type(cause)(f"shard {job.index}: {cause}") from None
            raise DatasetError(f"ray worker failed on shard {job.index}: {exc}") from exc
        for key, value in spent.items():
            seconds[key] = seconds.get(key, 0.0) + value
        record_shard(run, records, record, on_shard_written)
        free.append(actor)
    return free


def _stop(ray, actors: list, *, started_here: bool, reaper: RayReaper | None) -> None:
    """Stop this run's actors, then the Ray this run started; never raises Ray's errors."""
    for actor in actors:
        try:
            ray.kill(actor)
        except ray.exceptions.RayError:  # Ray is gone already: nothing left to stop
            pass
    try:
        if started_here:
            ray.shutdown()
    finally:
        if reaper is not None:
            reaper.close()


def run_ray(run: Any, todo: Sequence[ShardJob], records: dict, *, batch_size: int, workers: int,
            num_gpus_per_worker: float, ray_address: str | None, model: str, device: str | None,
            threads: int, on_shard_written: Callable[[int], None] | None,
            on_missing_embedding: str = "warn") -> dict[str, float]:
    """Encode ``todo`` over Ray actors, updating ``records`` and the manifest as shards finish.

    However it ends (done, an error, Ctrl-C, SIGTERM), the actors are killed and a
    Ray this call started is shut down; a driver killed outright is covered by
    :class:`~textenc.dataset.engines.reaper.RayReaper`.
    """
    if not todo:
        return {}
    ray = _require_ray()
    (started_here, reaper), actors = (False, None), []
    try:
        started_here, reaper = _init(ray, ray_address)
        count = min(workers, len(todo))
        actor_class = ray.remote(num_cpus=ACTOR_NUM_CPUS, num_gpus=num_gpus_per_worker,
                                 scheduling_strategy="SPREAD")(ShardWorker)
        for _ in range(count):
            actors.append(actor_class.remote(
                model=model, kind=run.clip.clip_type, device=device, settings=run.settings,
                context=run.context, folder=str(run.out), batch_size=batch_size,
                threads=threads, on_missing_embedding=on_missing_embedding))
        return _dispatch(ray, run, todo, records, list(actors), on_shard_written)
    finally:
        _stop(ray, actors, started_here=started_here, reaper=reaper)


def _dispatch(ray, run: Any, todo: Sequence[ShardJob], records: dict, free: list,
              on_shard_written: Callable[[int], None] | None) -> dict[str, float]:
    """Hand shards to free actors one at a time until all are recorded → seconds per stage."""
    jobs, pending, seconds = collections.deque(todo), {}, {}
    while jobs or pending:
        while free and jobs:
            job = jobs.popleft()
            actor = free.pop()
            pending[actor.encode.remote(job, _shard_rows(run.rows, job))] = (actor, job)
        free += _collect(ray, pending, run, records, seconds, on_shard_written)
    return seconds
