"""server.targeting: which version a device is offered under the release rules."""

from __future__ import annotations

from server.planning import VersionNode
from server.rollout import ReleaseView, Selector
from server.targeting import Decision, GoverningRelease, decide


def node(vid: int, number: int) -> VersionNode:
    return VersionNode(vid, number, f"sha256:{vid:064x}", vid - 1 or None, "s" * 64, 10, None, None)


VERSIONS = {i: node(i, i - 1) for i in range(1, 6)}  # ids 1..5 are versions 0..4


def gov(rid: int, version_id: int, state: str = "active", **kw) -> GoverningRelease:  # type: ignore[no-untyped-def]
    return GoverningRelease(
        ReleaseView(rid, version_id, Selector(**kw.pop("sel", {})), kw.pop("percent", 100.0), **kw),
        state,
    )


def test_without_releases_everyone_gets_the_latest() -> None:
    assert decide(VERSIONS, VERSIONS[5], None, "d", {}, VERSIONS[2]) == Decision(VERSIONS[5], None)


def test_release_governs_selected_devices_only() -> None:
    eu = gov(1, 4, sel={"tags": {"region": ["eu"]}})
    assert (
        decide(VERSIONS, VERSIONS[5], [eu], "d", {"region": "eu"}, VERSIONS[2]).target
        == VERSIONS[4]
    )
    us = decide(VERSIONS, VERSIONS[5], [eu], "d", {"region": "us"}, VERSIONS[2])
    assert us == Decision(None, None)


def test_paused_holds_and_halted_is_ignored() -> None:
    older = gov(1, 3, state="completed")
    paused = gov(2, 5, state="paused")
    d = decide(VERSIONS, VERSIONS[5], [older, paused], "d", {}, VERSIONS[1])
    assert d.target is None
    assert d.release == paused


def test_no_downgrade_without_an_explicit_rollback() -> None:
    back = gov(1, 2)
    assert decide(VERSIONS, VERSIONS[5], [back], "d", {}, VERSIONS[4]).target is None
    rollback = gov(2, 2, rollback=True)
    assert decide(VERSIONS, VERSIONS[5], [rollback], "d", {}, VERSIONS[4]).target == VERSIONS[2]


def test_outside_the_rollout_percentage_nothing_is_offered() -> None:
    none_in = gov(1, 5, percent=0.0)
    d = decide(VERSIONS, VERSIONS[5], [none_in], "d", {}, VERSIONS[1])
    assert d.target is None
    assert d.release == none_in
