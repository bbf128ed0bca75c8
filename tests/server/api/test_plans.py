"""Update plans: cheapest first with fallbacks, composed diffs that reach the target
digest exactly, cheap "nothing to do" answers (ETag / 304), and device isolation."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from diffs.container import DiffReader
from diffs.digest import file_digest
from diffs.patch_file import apply_to_file
from tests.server.api.conftest import ENROLL_SECRET, Lineage, publish_lineage


def enroll(client: TestClient, device_id: str) -> dict[str, str]:
    r = client.post(
        "/v1/devices/enroll", json={"enrollment_secret": ENROLL_SECRET, "device_id": device_id}
    )
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['credential']}"}


def poll(
    client: TestClient, device: str, headers: dict[str, str], digest: str | None, **extra: str
):  # type: ignore[no-untyped-def]
    params = {"model": "asr"}
    if digest:
        params["digest"] = digest
    return client.get(f"/v1/devices/{device}/update", params=params, headers={**headers, **extra})


@pytest.fixture
def published(client: TestClient, lineage: Lineage) -> TestClient:
    publish_lineage(client, lineage)
    return client


def test_up_to_date_device_gets_current_and_304(published: TestClient, lineage: Lineage) -> None:
    headers = enroll(published, "dev-a")
    r = poll(published, "dev-a", headers, lineage.digests[4])
    assert r.status_code == 200 and r.json()["status"] == "current"
    etag = r.headers["etag"]
    again = poll(published, "dev-a", headers, lineage.digests[4], **{"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""


def test_plan_is_cheapest_first_with_fallbacks(published: TestClient, lineage: Lineage) -> None:
    headers = enroll(published, "dev-b")
    plan = poll(published, "dev-b", headers, lineage.digests[1]).json()
    assert plan["status"] == "update"
    assert plan["target"]["version"] == 4 and plan["target"]["digest"] == lineage.digests[4]
    kinds = [o["kind"] for o in plan["options"]]
    assert kinds[-1] == "full"
    sizes = [o["total_bytes"] for o in plan["options"]]
    assert sizes == sorted(sizes)
    chain = next(o for o in plan["options"] if o["kind"] == "chain")
    assert [s["target_digest"] for s in chain["steps"]] == lineage.digests[2:5]
    assert [s["source_digest"] for s in chain["steps"]] == lineage.digests[1:4]
    assert chain["total_bytes"] == sum(len(d) for d in lineage.diffs[1:4])
    for option in plan["options"]:
        for step in option["steps"]:
            assert step["url"].startswith("/v1/blobs/") and step["target_path"].startswith("asr/")


def test_unknown_device_version_gets_full_snapshot(published: TestClient) -> None:
    headers = enroll(published, "dev-c")
    plan = poll(published, "dev-c", headers, "sha256:" + "0" * 64).json()
    assert [o["kind"] for o in plan["options"]] == ["full"]


def test_composed_diff_reaches_the_target_digest(published: TestClient, lineage: Lineage) -> None:
    headers = enroll(published, "dev-d")
    plan = poll(published, "dev-d", headers, lineage.digests[0]).json()
    composed = next(o for o in plan["options"] if o["kind"] == "composed")
    step = composed["steps"][0]
    blob = published.get(step["url"])
    assert blob.status_code == 200 and len(blob.content) == step["size"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.safetensors"
        digest = apply_to_file(lineage.files[0], [DiffReader(blob.content)], out)
        assert digest == file_digest(out) == lineage.digests[4] == step["target_digest"]
    # built once: the second plan names the same blob
    again = poll(published, "dev-d", headers, lineage.digests[0]).json()
    assert (
        next(o for o in again["options"] if o["kind"] == "composed")["steps"][0]["sha256"]
        == step["sha256"]
    )


def test_chain_applies_to_the_published_digests(published: TestClient, lineage: Lineage) -> None:
    headers = enroll(published, "dev-e")
    plan = poll(published, "dev-e", headers, lineage.digests[2]).json()
    chain = next(o for o in plan["options"] if o["kind"] == "chain")
    readers = [DiffReader(published.get(s["url"]).content) for s in chain["steps"]]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.safetensors"
        assert apply_to_file(lineage.files[2], readers, out) == lineage.digests[4]


def test_device_cannot_act_as_another(published: TestClient, lineage: Lineage) -> None:
    mine = enroll(published, "dev-f")
    enroll(published, "dev-g")
    r = poll(published, "dev-g", mine, lineage.digests[0])
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    report = {
        "model": "asr",
        "outcome": "updated",
        "to_version": 4,
        "to_digest": lineage.digests[4],
    }
    assert published.post("/v1/devices/dev-g/reports", json=report, headers=mine).status_code == 403
    assert published.post("/v1/devices/dev-f/reports", json=report, headers=mine).status_code == 202
    device = published.get("/v1/devices/dev-f").json()
    assert device["version"] == 4 and device["last_outcome"] == "updated"


def test_device_credentials_are_checked(published: TestClient, lineage: Lineage) -> None:
    bad = {"Authorization": "Bearer dev_nope"}
    assert poll(published, "dev-x", bad, lineage.digests[0]).status_code == 401
    r = published.post("/v1/devices/enroll", json={"enrollment_secret": "wrong"})
    assert r.status_code == 401
    enroll(published, "dev-h")
    r = published.post(
        "/v1/devices/enroll", json={"enrollment_secret": ENROLL_SECRET, "device_id": "dev-h"}
    )
    assert r.status_code == 409


def test_retired_target_is_not_offered(published: TestClient, lineage: Lineage) -> None:
    published.patch("/v1/models/asr/versions/4", json={"retired": True})
    headers = enroll(published, "dev-i")
    plan = poll(published, "dev-i", headers, lineage.digests[1]).json()
    assert plan["target"]["version"] == 3


def test_enrollment_with_a_device_chosen_credential_is_retry_safe(published: TestClient) -> None:
    body = {
        "enrollment_secret": ENROLL_SECRET,
        "device_id": "dev-retry",
        "credential": "dev_" + "x" * 40,
    }
    first = published.post("/v1/devices/enroll", json=body)
    assert first.status_code == 201
    again = published.post("/v1/devices/enroll", json=body)  # the first answer was lost
    assert again.status_code == 201
    assert again.json() == first.json()
    stolen = published.post("/v1/devices/enroll", json={**body, "credential": "dev_" + "y" * 40})
    assert stolen.status_code == 409
