"""The engines that encode a run's shards: ``local`` (this process) and ``ray`` (actors).

Both run :func:`textenc.dataset.pipeline.run_shards` and record each shard with
:func:`textenc.dataset.manifest.record_shard`, so they write the same bytes.
Ray itself is imported only when the ``ray`` engine runs.
"""

from .local import run_local
from .ray import run_ray

__all__ = ["run_local", "run_ray", "ENGINES"]

ENGINES = ("local", "ray")
