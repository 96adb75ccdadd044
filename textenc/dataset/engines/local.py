"""The ``local`` engine of :func:`textenc.dataset.encode_dataset`: one process,
tokenizing in a background thread (:func:`textenc.dataset.pipeline.run_shards`)."""

from __future__ import annotations

import os
import sys
from typing import Callable

from ..encode import CaptionEncoder
from ..manifest import Run, record_shard
from ..pipeline import ReusePlan, ShardJob, run_shards

__all__ = ["run_local"]


def _progress(total: int, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty() and "PYTEST_CURRENT_TEST" not in os.environ
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None  # the bar is a convenience; without tqdm the run is the same
    return tqdm(total=total, unit="caption", file=sys.stderr, smoothing=0.1)


def run_local(run: Run, todo: list[ShardJob], records: dict, *, batch_size: int,
              progress: bool | None,
              on_shard_written: Callable[[int], None] | None, plan: ReusePlan | None = None) -> dict[str, float]:
    """Encode ``todo`` in this process, updating ``records`` and the manifest as shards finish;
    ``plan`` says which rows reuse another's encoding (default: :func:`reuse_plan` of ``todo``)."""
    encoder = CaptionEncoder(run.clip, run.settings)
    bar = _progress(sum(j.stop - j.start for j in todo), progress)
    try:
        for record in run_shards(encoder, run.rows, todo, folder=str(run.out), context=run.context,
                                 batch_size=batch_size, on_batch=bar.update if bar else None, plan=plan):
            record_shard(run, records, record, on_shard_written)
    finally:
        if bar is not None:
            bar.close()
    return dict(encoder.seconds)
