"""Pure helpers for the time series: window alignment and folding grouped counts into
buckets. No I/O; the queries that feed them live in :mod:`server.dashboard.fleet`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from server.dashboard.schemas import Timeline, TimelineBucket

FAILED_OUTCOMES = frozenset({"failed", "rolled_back"})
APPLIED_OUTCOME = "updated"


@dataclass(frozen=True)
class Window:
    """``count`` buckets of ``seconds`` each, ending at a multiple of ``seconds``."""

    start: int
    seconds: int
    count: int

    @classmethod
    def ending_at(cls, now: float, hours: int, count: int) -> Window:
        seconds = max(60, hours * 3600 // count)
        end = -(-int(now) // seconds) * seconds
        return cls(end - seconds * count, seconds, count)

    @property
    def end(self) -> int:
        return self.start + self.seconds * self.count


@dataclass(frozen=True)
class GroupedReports:
    """One row of the grouped query: reports in one bucket with one outcome and reason."""

    bucket: int
    outcome: str
    reason: str | None
    reports: int
    bytes_downloaded: int
    bytes_full: int


def _moment(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def fold(window: Window, rows: Iterable[GroupedReports]) -> Timeline:
    """Every bucket of ``window`` (empty ones too), with the rows' counts added in.

    Bytes count only applied updates (``updated``): what they downloaded and what full
    snapshots of their targets would have cost. Reasons count only failures.
    """
    buckets = [
        TimelineBucket(
            start=_moment(window.start + i * window.seconds),
            outcomes={},
            reasons={},
            bytes_downloaded=0,
            bytes_full_equivalent=0,
        )
        for i in range(window.count)
    ]
    for row in rows:
        if not 0 <= row.bucket < window.count:
            continue
        bucket = buckets[row.bucket]
        bucket.outcomes[row.outcome] = bucket.outcomes.get(row.outcome, 0) + row.reports
        if row.outcome in FAILED_OUTCOMES:
            reason = row.reason or row.outcome
            bucket.reasons[reason] = bucket.reasons.get(reason, 0) + row.reports
        if row.outcome == APPLIED_OUTCOME:
            bucket.bytes_downloaded += row.bytes_downloaded
            bucket.bytes_full_equivalent += row.bytes_full
    return Timeline(
        start=_moment(window.start),
        end=_moment(window.end),
        bucket_seconds=window.seconds,
        buckets=buckets,
    )
