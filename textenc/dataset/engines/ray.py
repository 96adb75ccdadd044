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

Dedup spans the run as with the local engine: the driver plans which rows reuse
an earlier row's encoding (:func:`textenc.dataset.pipeline.reuse_plan` of every
shard to do) and hands each shard its part of the plan; a shard returns, besides
its record, the encodings of its rows that later shards read, which stay in Ray's
object store and go to those shards' actors. A shard is handed out once the
shards it reads from are written, and their encodings are dropped once every
shard reading them is. Compel's truncation warnings are counted in the actors and
reported by the driver, once per run as the local engine does.

Lifecycle: however the driver's run ends (finished, an error, Ctrl-C, SIGTERM,
which ``ray.init`` turns into ``SystemExit``), its actors are killed and a Ray
it started is shut down; if the driver is killed outright, the watchdog of
:mod:`textenc.dataset.engines.reaper` stops the Ray processes it started.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import torch

from ...errors import DatasetError, PromptWarning, TextencError
from ...prompts.dialects.compel.tokens import TRUNCATION_WARNING
from ...warn import Tally, count_of_kind, missing_embedding_policy
from ..encode import CaptionEncoder, EncodeSettings
from ..inputs import CaptionRows
from ..manifest import record_shard
from ..model import cast_for_compute, load_model, model_fingerprint, resolve_device
from ..pipeline import ReusePlan, ShardContext, ShardJob, run_shards
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

    def encode(self, job: ShardJob, rows: CaptionRows, plan: ReusePlan | None,
               *earlier: dict[int, Any]) -> tuple[tuple[dict, dict[str, float], Tally], dict[int, Any]]:
        """Encode and write one shard with its part of the run's ``plan`` (None: dedup within
        the shard); its repeats of earlier shards' captions read those shards' ``earlier``
        encodings (row -> encoding, or the reason it was rejected).

        Returns:
            ``((manifest record, seconds spent per stage, compel truncations), this shard's
            encodings that later shards read)``, as two Ray objects (``num_returns=2``).
        """
        self.encoder.seconds = dict.fromkeys(self.encoder.seconds, 0.0)
        results = {row: encoding for kept in earlier for row, encoding in kept.items()}
        # the driver's warning filters are not in this process: the policy is set again here and
        # compel's truncations are counted for the driver to report once per run
        with (missing_embedding_policy(self.on_missing_embedding),
              count_of_kind(PromptWarning, TRUNCATION_WARNING) as truncated):
            records = list(run_shards(self.encoder, rows, [job], folder=self.folder, context=self.context,
                                      batch_size=self.batch_size, plan=plan, results=results))
        later = {row: results[row] for row in plan.last_use if row in results} if plan else {}
        return (records[0], dict(self.encoder.seconds), truncated), later


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


@dataclasses.dataclass
class _Progress:
    """What the driver keeps while shards are out: the run, its records and the reports."""

    run: Any
    records: dict
    on_shard_written: Callable[[int], None] | None
    on_truncated: Callable[[Tally], None] | None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def recorded(self, record: dict, spent: dict[str, float], truncated: Tally) -> None:
        for key, value in spent.items():
            self.seconds[key] = self.seconds.get(key, 0.0) + value
        if self.on_truncated is not None:
            self.on_truncated(truncated)
        record_shard(self.run, self.records, record, self.on_shard_written)


class _Reads:
    """Which earlier shards of ``todo`` each shard reads encodings from (``plan``'s repeats),
    the references to those encodings while a shard still to write reads them."""

    def __init__(self, todo: Sequence[ShardJob], plan: ReusePlan) -> None:
        starts = [job.start for job in todo]

        def shard(row: int) -> int:
            return todo[bisect.bisect_right(starts, row) - 1].index

        self.sources: dict[int, set[int]] = {job.index: set() for job in todo}
        for row, first in plan.repeats.items():
            if shard(row) != shard(first):
                self.sources[shard(row)].add(shard(first))
        self.readers = collections.Counter(s for sources in self.sources.values() for s in sources)
        self.kept: dict[int, Any] = {}  # shard index -> its encodings later shards read (a Ray ref)
        self.written: set[int] = set()

    def ready(self, job: ShardJob) -> bool:
        return self.sources[job.index] <= self.written

    def inputs(self, job: ShardJob) -> list:
        return [self.kept[index] for index in sorted(self.sources[job.index])]

    def finished(self, job: ShardJob, later: Any) -> None:
        """``job`` is written, ``later`` its encodings later shards read: keep those, drop
        the encodings it read that no shard still to write reads."""
        self.written.add(job.index)
        if self.readers[job.index]:
            self.kept[job.index] = later
        for index in self.sources[job.index]:
            self.readers[index] -= 1
            if not self.readers[index]:
                del self.kept[index]


def _collect(ray, pending: dict, progress: _Progress, reads: _Reads) -> list:
    """Wait for finished shards, record them → the actors that are free again."""
    done, _ = ray.wait(list(pending), num_returns=1, timeout=_WAIT_SECONDS)
    free = []
    for ref in done:
        actor, job, later = pending.pop(ref)
        try:
            record, spent, truncated = ray.get(ref)
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, TextencError):  # a fault of the input, said as the local engine says it
                raise type(cause)(f"shard {job.index}: {cause}") from None
            raise DatasetError(f"ray worker failed on shard {job.index}: {exc}") from exc
        progress.recorded(record, spent, truncated)
        reads.finished(job, later)
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
            on_missing_embedding: str = "warn", plan: ReusePlan | None = None,
            on_truncated: Callable[[Tally], None] | None = None) -> dict[str, float]:
    """Encode ``todo`` over Ray actors, updating ``records`` and the manifest as shards finish.

    ``plan`` says which rows reuse another's encoding, across shards (default: none but
    each actor's within its shard); ``on_truncated`` is handed each shard's count of compel's
    truncation warnings (:func:`textenc.warn.first_of_kind`'s ``add``; default: dropped).

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
        progress = _Progress(run, records, on_shard_written, on_truncated)
        _dispatch(ray, todo, list(actors), progress, plan or ReusePlan({}, {}, {}))
        return progress.seconds
    finally:
        _stop(ray, actors, started_here=started_here, reaper=reaper)


def _dispatch(ray, todo: Sequence[ShardJob], free: list, progress: _Progress, plan: ReusePlan) -> None:
    """Hand shards to free actors one at a time, each once the shards it reads from are
    written, until all are recorded."""
    jobs, pending, reads = list(todo), {}, _Reads(todo, plan)
    while jobs or pending:
        while free and (job := next((job for job in jobs if reads.ready(job)), None)) is not None:
            jobs.remove(job)
            actor = free.pop()
            shard = plan.for_shard(job) if plan.repeats else None  # None: the actor plans its shard
            done, later = actor.encode.options(num_returns=2).remote(
                job, _shard_rows(progress.run.rows, job), shard, *reads.inputs(job))
            pending[done] = (actor, job, later)
        free += _collect(ray, pending, progress, reads)
