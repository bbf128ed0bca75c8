"""What devices are offered under releases: selection, phases, rate limit, overlapping
releases, automatic halt, and explicit signed rollback -- through the device API."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.lineage import Lineage
from tests.server.api.conftest import ENROLL_SECRET, publish_lineage


def enroll(client: TestClient, device_id: str, **tags: str) -> dict[str, str]:
    r = client.post(
        "/v1/devices/enroll",
        json={"enrollment_secret": ENROLL_SECRET, "device_id": device_id, "tags": tags},
    )
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['credential']}"}


def plan(client: TestClient, device: str, headers: dict[str, str], digest: str) -> dict:  # type: ignore[type-arg]
    r = client.get(
        f"/v1/devices/{device}/update", params={"model": "asr", "digest": digest}, headers=headers
    )
    assert r.status_code == 200, r.text
    return r.json()


def release(client: TestClient, version: int, **body: object) -> int:
    r = client.post(
        "/v1/releases", json={"model": "asr", "version": version, "activate": True, **body}
    )
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def test_selection_and_overlap(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage)
    base = lineage.digests[0]
    everyone = release(client, 2)
    eu = release(client, 3, selector={"tags": {"region": ["eu"]}})
    pinned = release(client, 4, selector={"devices": ["d-pinned"]})
    us, eu_dev, pin = (
        enroll(client, "d-us", region="us"),
        enroll(client, "d-eu", region="eu"),
        enroll(client, "d-pinned", region="eu"),
    )
    assert (
        plan(client, "d-us", us, base)["target"]["version"],
        plan(client, "d-us", us, base)["release_id"],
    ) == (
        2,
        everyone,
    )
    assert plan(client, "d-eu", eu_dev, base)["release_id"] == eu
    assert plan(client, "d-pinned", pin, base)["release_id"] == pinned
    # a device no release selects is offered nothing
    client.post(f"/v1/releases/{everyone}/halt")
    assert plan(client, "d-us", us, base)["status"] == "current"


def test_phases_expand_monotonically(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage)
    devices = {f"p{i}": enroll(client, f"p{i}") for i in range(40)}
    rid = release(client, 4, percent=25)

    def offered() -> set[str]:
        return {
            d
            for d, h in devices.items()
            if plan(client, d, h, lineage.digests[0])["status"] == "update"
        }

    first = offered()
    assert 2 <= len(first) <= 20
    client.post(f"/v1/releases/{rid}/expand", json={"percent": 75})
    second = offered()
    assert first < second
    client.post(f"/v1/releases/{rid}/pause")
    assert offered() == set()


def test_rate_limit(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage)
    devices = {f"r{i}": enroll(client, f"r{i}") for i in range(6)}
    release(client, 4, rate_per_minute=2)
    answers = [plan(client, d, h, lineage.digests[0])["status"] for d, h in devices.items()]
    assert answers.count("update") == 2
    # a device that started keeps getting its plan
    started = [d for d, a in zip(devices, answers, strict=True) if a == "update"]
    assert plan(client, started[0], devices[started[0]], lineage.digests[0])["status"] == "update"


def test_failures_halt_the_release(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage)
    rid = release(client, 4, min_attempts=3, failure_threshold=0.5)
    devices = {f"f{i}": enroll(client, f"f{i}") for i in range(5)}
    outcomes = ["failed", "updated", "failed"]
    for (device, headers), outcome in zip(devices.items(), outcomes, strict=False):
        assert plan(client, device, headers, lineage.digests[0])["release_id"] == rid
        report = {
            "model": "asr",
            "outcome": outcome,
            "release_id": rid,
            "reason": "health_check_failed" if outcome == "failed" else None,
            "to_version": 4,
            "to_digest": lineage.digests[4],
        }
        assert (
            client.post(f"/v1/devices/{device}/reports", json=report, headers=headers).status_code
            == 202
        )
    shown = client.get(f"/v1/releases/{rid}").json()
    assert shown["state"] == "halted"
    assert "2 of 3 devices failed" in shown["halt_reason"]
    assert shown["progress"]["failures_by_reason"] == {"health_check_failed": 2}
    # devices not yet updated no longer receive it
    for device in ("f3", "f4"):
        assert plan(client, device, devices[device], lineage.digests[0])["status"] == "current"


def test_rollback_is_explicit_and_signed(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage)
    headers = enroll(client, "rb")
    release(client, 4)
    back = release(client, 2)
    assert (
        plan(client, "rb", headers, lineage.digests[4])["status"] == "current"
    )  # no silent downgrade
    client.post(f"/v1/releases/{back}/halt")
    rollback = release(client, 2, rollback=True)
    offered = plan(client, "rb", headers, lineage.digests[4])
    assert offered["rollback"] is True
    assert offered["release_id"] == rollback
    assert offered["target"]["version"] == 2
    for option in offered["options"]:
        for step in option["steps"]:
            assert step["target_path"].startswith(f"asr/rollback{rollback}-")
