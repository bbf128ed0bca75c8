"""Which release a device gets, and when a release must stop: pure functions, no I/O.

Rules (each tested in ``tests/server/test_rollout.py``):

- **Selection.** A release selects a device when every tag key in its selector has one
  of the listed values on the device, and -- if it lists devices -- the device is listed.
  An empty selector selects every device of the model.
- **Overlap.** Of the active releases that select a device, the *most specific* wins:
  an explicit device list beats tags, more tag keys beat fewer; ties go to the *newest*
  (highest id).
- **Phases.** A device is in the rollout when ``bucket(release, device) < percent``,
  with ``bucket`` a stable hash in [0, 100). Raising the percentage only adds devices.
- **Rate limit.** At most ``rate_per_minute`` devices *start* the release per minute;
  devices already started are never held back.
- **Window.** Outside ``[window_start, window_end)`` nobody starts the release.
- **Automatic halt.** Once at least ``min_attempts`` devices finished (applied or
  failed), a failure ratio above ``failure_threshold`` halts the release.
- **Quality gate.** A release with ``max_wer_regression`` activates only if no cohort's
  WER of the target version exceeds the replaced version's by more than that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Selector:
    tags: Mapping[str, Sequence[str]] = field(default_factory=dict)
    devices: Sequence[str] = ()

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Selector:
        tags = {
            str(k): [str(v)] if isinstance(v, str) else [str(x) for x in v]
            for k, v in raw.get("tags", {}).items()
        }
        return cls(tags, tuple(str(d) for d in raw.get("devices", ())))

    def selects(self, device_id: str, tags: Mapping[str, str]) -> bool:
        if self.devices and device_id not in self.devices:
            return False
        return all(tags.get(key) in values for key, values in self.tags.items())

    @property
    def specificity(self) -> tuple[int, int]:
        return (1 if self.devices else 0, len(self.tags))


@dataclass(frozen=True)
class ReleaseCanary:
    """A release's canary bundle, as plans name it."""

    sha256: str
    size: int
    max_wer: float
    clips: int


@dataclass(frozen=True)
class ReleaseView:
    """What the rollout rules (and the plans) need to know of a release."""

    id: int
    version_id: int
    selector: Selector
    percent: float
    rate_per_minute: int | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None
    rollback: bool = False
    canary: ReleaseCanary | None = None


def bucket(release_id: int, device_id: str) -> float:
    """The device's stable place in [0, 100) for this release."""
    digest = hashlib.sha256(f"{release_id}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def choose_release(
    releases: Iterable[ReleaseView], device_id: str, tags: Mapping[str, str]
) -> ReleaseView | None:
    """The active release that governs the device: most specific, then newest."""
    eligible = [r for r in releases if r.selector.selects(device_id, tags)]
    if not eligible:
        return None
    return max(eligible, key=lambda r: (r.selector.specificity, r.id))


def in_rollout(release: ReleaseView, device_id: str) -> bool:
    return bucket(release.id, device_id) < release.percent


def may_start(
    release: ReleaseView, *, already_started: bool, started_last_minute: int, now: datetime
) -> bool:
    """Whether a device in the rollout may begin now (window and rate limit)."""
    if already_started:
        return True
    if release.window_start is not None and now < release.window_start:
        return False
    if release.window_end is not None and now >= release.window_end:
        return False
    return release.rate_per_minute is None or started_last_minute < release.rate_per_minute


def halt_reason(applied: int, failed: int, min_attempts: int, threshold: float) -> str | None:
    """Why the release must halt now, or ``None``."""
    attempts = applied + failed
    if attempts < min_attempts or attempts == 0:
        return None
    ratio = failed / attempts
    if ratio > threshold:
        return f"{failed} of {attempts} devices failed ({ratio:.0%} > {threshold:.0%})"
    return None


def quality_gate(
    target: Mapping[str, float], replaced: Mapping[str, float], max_regression: float
) -> list[str]:
    """Cohorts whose WER regresses by more than ``max_regression`` (empty: the gate passes).

    A cohort the replaced version measured but the target did not is a failure too: a
    gate cannot pass on missing evidence.
    """
    problems = []
    for cohort, before in sorted(replaced.items()):
        after = target.get(cohort)
        if after is None:
            problems.append(f"{cohort}: no WER measured for the new version")
        elif after - before > max_regression:
            problems.append(f"{cohort}: WER {before:.4f} -> {after:.4f} (+{after - before:.4f})")
    return problems
