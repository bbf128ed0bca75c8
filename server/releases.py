"""Releases: creating, activating (behind the quality gate), pausing, resuming, halting,
expanding, and recording each device's progress -- with the automatic halt.

The rules are in :mod:`server.rollout` (pure); this module applies them to the
database, one transaction per action.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.db import transaction
from server.errors import BadRequestError, ConflictError, NotFoundError
from server.models import AssignmentRow, ModelRow, ReleaseRow, VersionRow
from server.rollout import (
    ReleaseCanary,
    ReleaseView,
    Selector,
    halt_reason,
    may_start,
    quality_gate,
)
from server.targeting import GoverningRelease

STATES = ("draft", "active", "paused", "halted", "completed")
TRANSITIONS: dict[str, dict[str, str]] = {
    "activate": {"draft": "active"},
    "pause": {"active": "paused"},
    "resume": {"paused": "active"},
    "halt": {"draft": "halted", "active": "halted", "paused": "halted"},
    "complete": {"active": "completed", "paused": "completed"},
}


@dataclass(frozen=True)
class ReleaseSpec:
    model: str
    version: int
    name: str
    selector: dict[str, Any]
    percent: float
    rate_per_minute: int | None
    window_start: datetime | None
    window_end: datetime | None
    rollback: bool
    failure_threshold: float
    min_attempts: int
    max_wer_regression: float | None


def view_of(row: ReleaseRow) -> ReleaseView:
    """The release as the rules see it (loads ``row.canary``, the bundle's blob row)."""
    canary = None
    blob, max_wer, clips = row.canary, row.canary_max_wer, row.canary_clips
    if blob is not None and max_wer is not None and clips is not None:
        canary = ReleaseCanary(blob.sha256, blob.size, max_wer, clips)
    return ReleaseView(
        id=row.id,
        version_id=row.version_id,
        selector=Selector.from_json(row.selector),
        percent=row.percent,
        rate_per_minute=row.rate_per_minute,
        window_start=_aware(row.window_start),
        window_end=_aware(row.window_end),
        rollback=row.rollback,
        canary=canary,
    )


def _aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def create(session: Session, spec: ReleaseSpec, actor: str) -> ReleaseRow:
    model = session.scalar(select(ModelRow).where(ModelRow.name == spec.model))
    if model is None:
        raise NotFoundError(f"no model named {spec.model!r}")
    version = session.scalar(
        select(VersionRow).where(VersionRow.model_id == model.id, VersionRow.number == spec.version)
    )
    if version is None:
        raise NotFoundError(f"model {spec.model!r} has no version {spec.version}")
    if version.retired:
        raise ConflictError(f"version {spec.version} is retired")
    if spec.window_start and spec.window_end and spec.window_end <= spec.window_start:
        raise BadRequestError("the window must end after it starts")
    row = ReleaseRow(
        model_id=model.id,
        version_id=version.id,
        name=spec.name,
        state="draft",
        selector=spec.selector,
        percent=spec.percent,
        rate_per_minute=spec.rate_per_minute,
        window_start=spec.window_start,
        window_end=spec.window_end,
        rollback=spec.rollback,
        failure_threshold=spec.failure_threshold,
        min_attempts=spec.min_attempts,
        max_wer_regression=spec.max_wer_regression,
        created_by=actor,
    )
    session.add(row)
    session.flush()
    return row


def get(session: Session, release_id: int) -> ReleaseRow:
    row = session.get(ReleaseRow, release_id)
    if row is None:
        raise NotFoundError(f"no release {release_id}")
    return row


def transition(session: Session, row: ReleaseRow, action: str, reason: str | None = None) -> None:
    allowed = TRANSITIONS[action]
    if row.state not in allowed:
        raise ConflictError(f"cannot {action} a release that is {row.state}")
    if action == "activate":
        check_quality_gate(session, row)
    row.state = allowed[row.state]
    if action == "halt":
        row.halt_reason = reason or "halted by an operator"
    row.updated_at = datetime.now(UTC)


def expand(row: ReleaseRow, percent: float) -> None:
    """Raise the rollout percentage (never lowered: devices already in stay in)."""
    if percent < row.percent:
        raise ConflictError(
            f"a rollout only expands: {percent}% is below the current {row.percent}%"
        )
    if row.state in ("halted", "completed"):
        raise ConflictError(f"the release is {row.state}")
    row.percent = percent
    row.updated_at = datetime.now(UTC)


def replaced_version(session: Session, row: ReleaseRow) -> VersionRow | None:
    """The version this release replaces: the previous version of the model."""
    target = session.get(VersionRow, row.version_id)
    assert target is not None
    if row.rollback:
        return None
    return session.scalar(
        select(VersionRow)
        .where(VersionRow.model_id == row.model_id, VersionRow.number < target.number)
        .order_by(VersionRow.number.desc())
        .limit(1)
    )


def check_quality_gate(session: Session, row: ReleaseRow) -> None:
    if row.max_wer_regression is None:
        return
    target = session.get(VersionRow, row.version_id)
    assert target is not None
    previous = replaced_version(session, row)
    if previous is None:
        return
    before = _cohort_wer(previous.metrics)
    after = _cohort_wer(target.metrics)
    if not before:
        raise ConflictError(
            f"quality gate: version {previous.number} has no per-cohort WER to compare against"
        )
    problems = quality_gate(after, before, row.max_wer_regression)
    if problems:
        raise ConflictError("quality gate: " + "; ".join(problems))


def _cohort_wer(metrics: dict[str, Any]) -> dict[str, float]:
    raw = metrics.get("wer_by_cohort", {}) if isinstance(metrics, dict) else {}
    return {str(k): float(v) for k, v in raw.items() if isinstance(v, int | float)}


def start_release(
    sessions: sessionmaker[Session], governing: GoverningRelease, device_id: str
) -> bool:
    """Whether the device may (still) take the release now; records that it started.

    A device that started before always may. A new one must be inside the release's
    window and under its rate limit (devices started in the last minute).
    """
    release = governing.release
    now = datetime.now(UTC)
    try:
        with transaction(sessions) as session:
            started = session.scalar(
                select(AssignmentRow.id).where(
                    AssignmentRow.release_id == release.id, AssignmentRow.device_id == device_id
                )
            )
            if started is not None:
                return True
            recent = session.scalar(
                select(func.count()).where(
                    AssignmentRow.release_id == release.id,
                    AssignmentRow.assigned_at >= now - timedelta(minutes=1),
                )
            )
            if governing.state == "active" and not may_start(
                release, already_started=False, started_last_minute=recent or 0, now=now
            ):
                return False
            session.add(
                AssignmentRow(
                    release_id=release.id,
                    device_id=device_id,
                    status="pending",
                    assigned_at=now,
                    updated_at=now,
                )
            )
    except IntegrityError:
        return True  # another request of the same device recorded it first
    return True


def record_outcome(
    session: Session, release_id: int, device_id: str, outcome: str, reason: str | None, nbytes: int
) -> None:
    """Update a device's assignment from its report; halt the release if it must."""
    assignment = session.scalar(
        select(AssignmentRow).where(
            AssignmentRow.release_id == release_id, AssignmentRow.device_id == device_id
        )
    )
    if assignment is None:
        return
    if outcome in ("updated", "current"):
        assignment.status, assignment.reason = "applied", None
    elif outcome in ("failed", "rolled_back"):
        assignment.status, assignment.reason = "failed", reason or outcome
    assignment.bytes_downloaded += nbytes
    assignment.updated_at = datetime.now(UTC)
    session.flush()
    release = session.get(ReleaseRow, release_id, with_for_update=True)
    if release is None or release.state != "active":
        return
    counts = status_counts(session, release_id)
    why = halt_reason(
        counts.get("applied", 0),
        counts.get("failed", 0),
        release.min_attempts,
        release.failure_threshold,
    )
    if why is not None:
        release.state = "halted"
        release.halt_reason = f"automatic halt: {why}"
        release.updated_at = datetime.now(UTC)


def status_counts(session: Session, release_id: int) -> dict[str, int]:
    rows = session.execute(
        select(AssignmentRow.status, func.count())
        .where(AssignmentRow.release_id == release_id)
        .group_by(AssignmentRow.status)
    )
    return {status: count for status, count in rows}


def reason_counts(session: Session, release_id: int) -> dict[str, int]:
    rows = session.execute(
        select(AssignmentRow.reason, func.count())
        .where(AssignmentRow.release_id == release_id, AssignmentRow.status == "failed")
        .group_by(AssignmentRow.reason)
    )
    return {str(reason): count for reason, count in rows}
