"""The ``ray`` engine of :func:`textenc.dataset.encode_dataset` (extra ``textenc[ray]``).

Shards are handed out one at a time to ``workers`` actors; each actor loads
the model once and writes its shards itself with the same code as the local
engine (:func:`textenc.dataset.pipeline.run_shards`), so the files do not
depend on the engine or the worker count. The driver alone writes the manifest.

Actors ask for ``num_cpus=0.5``: on a 2-CPU machine, actors holding whole CPUs
leave none for Ray's own tasks and the job hangs without an error. Each actor
sets the run's torch thread count (``threads``, recorded in the manifest)
itself, the same count the local engine uses, so both write the same bytes.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Sequence

import torch

from ...errors import DatasetError
from ..encode import CaptionEncoder, EncodeSettings
from ..inputs import CaptionRows
from ..manifest import record_shard
from ..model import cast_for_compute, load_model, model_fingerprint, resolve_device
from ..pipeline import ShardContext, ShardJob, run_shards

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
                 context: ShardContext, folder: str, batch_size: int, threads: int) -> None:
        torch.set_num_threads(threads)
        clip = load_model(model, kind=kind, device=resolve_device(device))
        if model_fingerprint(clip) != context.fingerprint:
            raise DatasetError(f"{model} changed while the dataset was being encoded")
        cast_for_compute(clip, settings.compute_dtype)
        self.encoder = CaptionEncoder(clip, settings)
        self.context, self.folder, self.batch_size = context, folder, batch_size

    def encode(self, job: ShardJob, rows: CaptionRows) -> tuple[dict, dict[str, float]]:
        """Encode and write one shard → ``(manifest record, seconds spent per stage)``."""
        self.encoder.seconds = dict.fromkeys(self.encoder.seconds, 0.0)
        records = list(run_shards(self.encoder, rows, [job], folder=self.folder,
                                  context=self.context, batch_size=self.batch_size))
        return records[0], dict(self.encoder.seconds)


def _init(ray, address: str | None) -> bool:
    """Connect to Ray → True when this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    return True


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
            raise DatasetError(f"ray worker failed on shard {job.index}: {exc}") from exc
        for key, value in spent.items():
            seconds[key] = seconds.get(key, 0.0) + value
        record_shard(run, records, record, on_shard_written)
        free.append(actor)
    return free


def run_ray(run: Any, todo: Sequence[ShardJob], records: dict, *, batch_size: int, workers: int,
            num_gpus_per_worker: float, ray_address: str | None, model: str, device: str | None,
            threads: int,
            on_shard_written: Callable[[int], None] | None) -> dict[str, float]:
    """Encode ``todo`` over Ray actors, updating ``records`` and the manifest as shards finish."""
    if not todo:
        return {}
    ray = _require_ray()
    started_here = _init(ray, ray_address)
    count = min(workers, len(todo))
    actor_class = ray.remote(num_cpus=ACTOR_NUM_CPUS, num_gpus=num_gpus_per_worker)(ShardWorker)
    actors = [actor_class.remote(model=model, kind=run.clip.clip_type, device=device,
                                 settings=run.settings, context=run.context, folder=str(run.out),
                                 batch_size=batch_size, threads=threads)
              for _ in range(count)]
    jobs, pending, seconds = collections.deque(todo), {}, {}
    try:
        free = list(actors)
        while jobs or pending:
            while free and jobs:
                job = jobs.popleft()
                actor = free.pop()
                pending[actor.encode.remote(job, _shard_rows(run.rows, job))] = (actor, job)
            free += _collect(ray, pending, run, records, seconds, on_shard_written)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()
    return seconds
