"""What one :func:`textenc.dataset.encode_dataset` call did: :class:`DatasetReport`."""

from __future__ import annotations

import dataclasses

__all__ = ["DatasetReport"]


@dataclasses.dataclass
class DatasetReport:
    """What :func:`encode_dataset` did (or, with ``dry_run``, would do)."""

    out: str
    rows: int
    encoded: int
    shards: int
    shards_written: int
    shards_skipped: int
    seconds: float
    captions_per_s: float
    bytes: int
    windows_histogram: dict[str, int]
    rejected: list[dict]
    timings: dict[str, float]
    reused: int = 0  # rows written from an identical caption's encoding (dedup)
    dry_run: bool = False
    plan: list[dict] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        return (f"{self.rows} rows, {self.encoded} encoded ({self.reused} reused from an identical "
                f"caption), {len(self.rejected)} rejected; "
                f"{verb} {self.shards_written} of {self.shards} shards "
                f"({self.shards_skipped} skipped), {self.bytes / 1e6:.1f} MB; "
                f"{self.captions_per_s:.0f} captions/s")
