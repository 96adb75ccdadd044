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
        """One line: rows, what was done and how fast; a run with nothing left to do says so."""
        counts = (f"{self.rows} rows, {self.encoded} encoded ({self.reused} reused from an identical "
                  f"caption), {len(self.rejected)} rejected; ")
        if not self.dry_run and self.shards_written == 0 and self.shards_skipped == self.shards:
            return (counts + f"already complete: all {self.shards} shards were written by an earlier run, "
                    f"nothing to encode, {self.bytes / 1e6:.1f} MB")
        verb = "would write" if self.dry_run else "wrote"
        return (counts + f"{verb} {self.shards_written} of {self.shards} shards "
                f"({self.shards_skipped} skipped), {self.bytes / 1e6:.1f} MB; "
                f"{format_rate(self.captions_per_s)} captions/s")


def format_rate(per_second: float) -> str:
    """A rate with three significant digits below 1000, whole numbers above.

    >>> format_rate(0.4567), format_rate(12.34), format_rate(104.2), format_rate(12345.6)
    ('0.457', '12.3', '104', '12346')
    """
    return f"{per_second:.0f}" if per_second >= 1000 else f"{per_second:.3g}"
