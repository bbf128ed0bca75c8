"""Releases over the API: lifecycle, expansion only upward, the quality gate, the
audit log, and authorization."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.lineage import Lineage
from tests.server.api.conftest import publish_lineage


def create(client: TestClient, **body: object) -> dict:  # type: ignore[type-arg]
    r = client.post("/v1/releases", json={"model": "asr", "version": 4, **body})
    assert r.status_code == 201, r.text
    return r.json()


def test_lifecycle_and_expansion(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage)
    rel = create(client, percent=10, selector={"tags": {"region": ["eu"]}})
    assert rel["state"] == "draft"
    rid = rel["id"]
    for action, state in [("activate", "active"), ("pause", "paused"), ("resume", "active")]:
        r = client.post(f"/v1/releases/{rid}/{action}")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == state
    assert client.post(f"/v1/releases/{rid}/resume").status_code == 409
    assert client.post(f"/v1/releases/{rid}/expand", json={"percent": 50}).json()["percent"] == 50
    shrink = client.post(f"/v1/releases/{rid}/expand", json={"percent": 20})
    assert shrink.status_code == 409
    assert "only expands" in shrink.json()["error"]["message"]
    halted = client.post(f"/v1/releases/{rid}/halt", json={"reason": "bad metrics"}).json()
    assert (halted["state"], halted["halt_reason"]) == ("halted", "bad metrics")
    assert client.post(f"/v1/releases/{rid}/frobnicate").status_code == 404
    listed = client.get("/v1/releases", params={"model": "asr"}).json()
    assert [r["id"] for r in listed] == [rid]
    assert listed[0]["progress"]["started"] == 0
    actions = [a["action"] for a in client.get("/v1/audit").json()]
    # refused actions leave no trace: the audit entry commits with the action
    assert actions[:6] == [
        "release.halt",
        "release.expand",
        "release.resume",
        "release.pause",
        "release.activate",
        "release.create",
    ]


def test_quality_gate_refuses_a_cohort_regression(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage)
    client.patch(
        "/v1/models/asr/versions/3", json={"metrics": {"wer_by_cohort": {"us": 0.08, "scot": 0.12}}}
    )
    client.patch(
        "/v1/models/asr/versions/4", json={"metrics": {"wer_by_cohort": {"us": 0.07, "scot": 0.16}}}
    )
    gated = create(client, max_wer_regression=0.01)
    r = client.post(f"/v1/releases/{gated['id']}/activate")
    assert r.status_code == 409
    assert "scot" in r.json()["error"]["message"]
    assert client.get(f"/v1/releases/{gated['id']}").json()["state"] == "draft"
    loose = create(client, max_wer_regression=0.05, activate=True)
    assert loose["state"] == "active"


def test_release_authorization(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage)
    rel = create(client)
    reader = client.post("/v1/tokens", json={"name": "ro", "scopes": ["read"]}).json()["token"]
    headers = {"Authorization": f"Bearer {reader}"}
    assert client.get(f"/v1/releases/{rel['id']}", headers=headers).status_code == 200
    assert client.post(f"/v1/releases/{rel['id']}/pause", headers=headers).status_code == 403
    assert (
        client.post(
            "/v1/releases", json={"model": "asr", "version": 1}, headers=headers
        ).status_code
        == 403
    )
    assert client.get("/v1/audit", headers=headers).status_code == 200
    assert client.post("/v1/releases", json={"model": "asr", "version": 99}).status_code == 404
