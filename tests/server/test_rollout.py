"""The rollout rules of server.rollout: selection, overlap, phases, rate limit, window,
automatic halt, quality gate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from server.rollout import (
    ReleaseView,
    Selector,
    bucket,
    choose_release,
    halt_reason,
    in_rollout,
    may_start,
    quality_gate,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def release(
    rid: int,
    *,
    tags: dict[str, list[str]] | None = None,
    devices: tuple[str, ...] = (),
    percent: float = 100.0,
    **kw,
) -> ReleaseView:  # type: ignore[no-untyped-def]
    return ReleaseView(rid, 100 + rid, Selector(tags or {}, devices), percent, **kw)


def test_selector_matches_every_tag_and_the_device_list() -> None:
    sel = Selector({"region": ["eu", "us"], "hw": ["v2"]})
    assert sel.selects("d", {"region": "eu", "hw": "v2", "extra": "x"})
    assert not sel.selects("d", {"region": "eu"})
    assert not sel.selects("d", {"region": "asia", "hw": "v2"})
    assert Selector().selects("anyone", {})
    listed = Selector({}, ("a", "b"))
    assert listed.selects("a", {})
    assert not listed.selects("c", {})
    assert Selector.from_json({"tags": {"region": "eu"}}).selects("x", {"region": "eu"})


def test_overlap_most_specific_then_newest() -> None:
    everyone = release(1)
    eu = release(2, tags={"region": ["eu"]})
    eu_v2 = release(3, tags={"region": ["eu"], "hw": ["v2"]})
    newer_everyone = release(4)
    explicit = release(5, devices=("d9",))
    releases = [everyone, eu, eu_v2, newer_everyone, explicit]
    assert choose_release(releases, "d1", {"region": "us"}) == newer_everyone
    assert choose_release(releases, "d1", {"region": "eu"}) == eu
    assert choose_release(releases, "d1", {"region": "eu", "hw": "v2"}) == eu_v2
    assert choose_release(releases, "d9", {"region": "eu", "hw": "v2"}) == explicit
    assert choose_release([eu], "d1", {"region": "us"}) is None
    # two equally specific releases: the newest wins
    assert (
        choose_release(
            [release(7, tags={"a": ["1"]}), release(6, tags={"b": ["1"]})],
            "d",
            {"a": "1", "b": "1"},
        ).id
        == 7
    )


def test_phases_are_stable_and_monotonic() -> None:
    devices = [f"dev-{i}" for i in range(2000)]
    at10 = {d for d in devices if in_rollout(release(1, percent=10), d)}
    at50 = {d for d in devices if in_rollout(release(1, percent=50), d)}
    assert at10 <= at50  # raising 10% -> 50% keeps the first 10%
    assert 150 < len(at10) < 250
    assert 900 < len(at50) < 1100
    assert {d for d in devices if in_rollout(release(1, percent=0), d)} == set()
    assert {d for d in devices if in_rollout(release(1, percent=100), d)} == set(devices)
    assert bucket(1, "dev-1") == bucket(1, "dev-1")
    assert bucket(1, "dev-1") != bucket(2, "dev-1")  # each release shuffles anew


def test_rate_limit_holds_back_only_new_devices() -> None:
    limited = release(1, rate_per_minute=5)
    assert may_start(limited, already_started=False, started_last_minute=4, now=NOW)
    assert not may_start(limited, already_started=False, started_last_minute=5, now=NOW)
    assert may_start(limited, already_started=True, started_last_minute=50, now=NOW)
    assert may_start(release(2), already_started=False, started_last_minute=10**6, now=NOW)


def test_window() -> None:
    windowed = release(1, window_start=NOW, window_end=NOW + timedelta(hours=2))
    assert not may_start(
        windowed, already_started=False, started_last_minute=0, now=NOW - timedelta(seconds=1)
    )
    assert may_start(windowed, already_started=False, started_last_minute=0, now=NOW)
    assert not may_start(
        windowed, already_started=False, started_last_minute=0, now=NOW + timedelta(hours=2)
    )


@pytest.mark.parametrize(
    ("applied", "failed", "halts"),
    [(0, 0, False), (1, 3, False), (3, 2, True), (8, 2, False), (7, 3, True), (0, 5, True)],
)
def test_automatic_halt_after_min_attempts(applied: int, failed: int, halts: bool) -> None:
    reason = halt_reason(applied, failed, min_attempts=5, threshold=0.25)
    assert (reason is not None) == halts
    if reason:
        assert f"{failed} of {applied + failed}" in reason


def test_quality_gate() -> None:
    before = {"en-us": 0.08, "en-gb-scotland": 0.12}
    assert quality_gate({"en-us": 0.081, "en-gb-scotland": 0.125}, before, 0.01) == []
    problems = quality_gate({"en-us": 0.07, "en-gb-scotland": 0.15}, before, 0.01)
    assert len(problems) == 1
    assert problems[0].startswith("en-gb-scotland")
    assert quality_gate({"en-us": 0.07}, before, 0.01) == [
        "en-gb-scotland: no WER measured for the new version"
    ]
