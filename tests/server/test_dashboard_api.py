"""The dashboard: its page and static files, ``/v1/whoami``, and the fleet JSON it draws
from (version distribution, outcomes over time, device search), on SQLite and PostgreSQL."""

# The API tests' fixtures are imported below; test arguments then shadow the imports.
# ruff: noqa: F811

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient

from server.models import ReportRow
from tests.lineage import Lineage
from tests.server.api.conftest import (  # noqa: F401  (fixtures)
    ADMIN_TOKEN,
    ENROLL_SECRET,
    client,
    keys_dir,
    lineage,
    pg_url,
    publish_lineage,
    settings,
)


def enroll(client: TestClient, device_id: str, **tags: str) -> dict[str, str]:
    r = client.post(
        "/v1/devices/enroll",
        json={"enrollment_secret": ENROLL_SECRET, "device_id": device_id, "tags": tags},
    )
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['credential']}"}


def report(client: TestClient, device_id: str, headers: dict[str, str], **body: object) -> None:
    r = client.post(
        f"/v1/devices/{device_id}/reports", json={"model": "asr", **body}, headers=headers
    )
    assert r.status_code == 202, r.text


def token(client: TestClient, *scopes: str) -> dict[str, str]:
    r = client.post("/v1/tokens", json={"name": f"t-{'-'.join(scopes)}", "scopes": list(scopes)})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def test_whoami_names_the_token_and_its_scopes(client: TestClient) -> None:
    me = client.get("/v1/whoami").json()
    assert me == {
        "name": "bootstrap",
        "scopes": ["admin"],
        "effective_scopes": ["read", "publish", "admin"],
    }
    reader = token(client, "read")
    assert client.get("/v1/whoami", headers=reader).json()["effective_scopes"] == ["read"]
    publisher = token(client, "publish")
    assert client.get("/v1/whoami", headers=publisher).json()["effective_scopes"] == [
        "read",
        "publish",
    ]
    anonymous = client.get("/v1/whoami", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    bogus = client.get("/v1/whoami", headers={"Authorization": "Bearer dct_nope"})
    assert bogus.status_code == 401


def test_dashboard_page_and_assets_are_served(client: TestClient) -> None:
    page = client.get("/dashboard", headers={"Authorization": ""})
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    html = page.text
    assert 'id="token-input"' in html and 'id="releases"' in html and 'id="versions"' in html
    assert "<script>" not in html  # no inline script: the CSP would refuse it
    for asset, kind in [("dashboard.js", "javascript"), ("dashboard.css", "text/css")]:
        assert f"/dashboard/static/{asset}?v=" in html
        served = client.get(f"/dashboard/static/{asset}", headers={"Authorization": ""})
        assert served.status_code == 200
        assert kind in served.headers["content-type"]
    script = client.get("/dashboard/static/dashboard.js").text
    assert "innerHTML" not in script  # device-supplied text only ever goes in as text
    assert "sessionStorage" in script and "Bearer" in script


def test_fleet_endpoints_need_a_read_token(client: TestClient) -> None:
    for path in ("/v1/fleet/summary", "/v1/fleet/timeline", "/v1/fleet/devices"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 401
        assert client.get(path, headers=token(client, "read")).status_code == 200


def test_summary_and_timeline_from_reports(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage)
    snapshot_v2 = client.get("/v1/models/asr/versions/2").json()["snapshot_size"]
    creds = {d: enroll(client, d, region="eu") for d in ("a1", "a2", "b1", "c1")}
    for device, nbytes in [("a1", 300), ("a2", 500)]:
        report(
            client,
            device,
            creds[device],
            outcome="updated",
            from_version=0,
            to_version=2,
            to_digest=lineage.digests[2],
            bytes_downloaded=nbytes,
        )
    report(
        client,
        "b1",
        creds["b1"],
        outcome="failed",
        reason="digest_mismatch",
        from_version=0,
        from_digest=lineage.digests[0],
        to_version=2,
        bytes_downloaded=50,
    )

    summary = client.get("/v1/fleet/summary").json()
    assert summary["devices"] == 4 and summary["unreported"] == 1
    (asr,) = summary["models"]
    assert asr["model"] == "asr" and asr["latest"] == 4 and asr["devices"] == 3
    assert asr["versions"] == [{"version": 2, "devices": 2}, {"version": 0, "devices": 1}]
    assert summary["last_outcomes"] == {"updated": 2, "failed": 1}
    assert summary["bytes_downloaded"] == 800
    assert summary["bytes_full_equivalent"] == 2 * snapshot_v2

    timeline = client.get("/v1/fleet/timeline", params={"hours": 6, "buckets": 6}).json()
    assert timeline["bucket_seconds"] == 3600 and len(timeline["buckets"]) == 6
    last = timeline["buckets"][-1]
    assert last["outcomes"] == {"updated": 2, "failed": 1}
    assert last["reasons"] == {"digest_mismatch": 1}
    assert (last["bytes_downloaded"], last["bytes_full_equivalent"]) == (800, 2 * snapshot_v2)
    assert all(not b["outcomes"] for b in timeline["buckets"][:-1])
    other = client.get("/v1/fleet/timeline", params={"model": "asr", "version": 1}).json()
    assert all(not b["outcomes"] for b in other["buckets"])
    narrowed = client.get("/v1/fleet/timeline", params={"model": "asr", "version": 2}).json()
    assert narrowed["buckets"][-1]["outcomes"] == {"updated": 2, "failed": 1}


def test_timeline_puts_reports_in_their_hour(client: TestClient) -> None:
    client.post("/v1/models", json={"name": "asr"})
    enroll(client, "d1")
    now = datetime.now(UTC)
    # the window starts 23 to 24 hours ago (on an hour), so 22.5 h is always inside it
    ages = {"updated": [0.2, 0.3, 5.5], "failed": [5.6, 30.0], "rolled_back": [22.5]}
    with client.app.state.context.sessions.begin() as session:
        for outcome, hours_ago in ages.items():
            for age in hours_ago:
                session.add(
                    ReportRow(
                        device_id="d1",
                        outcome=outcome,
                        reason="boom" if outcome == "failed" else None,
                        model_name="asr",
                        to_version=1,
                        bytes_downloaded=10,
                        detail={},
                        created_at=now - timedelta(hours=age),
                    )
                )
    timeline = client.get("/v1/fleet/timeline", params={"hours": 24, "buckets": 24}).json()
    start = datetime.fromisoformat(timeline["start"]).timestamp()
    assert start % 3600 == 0
    assert datetime.fromisoformat(timeline["end"]).timestamp() == start + 24 * 3600
    assert start < time.time() <= start + 24 * 3600
    expected: list[dict[str, int]] = [{} for _ in range(24)]
    for outcome, hours_ago in ages.items():
        for age in hours_ago:
            index = int(((now - timedelta(hours=age)).timestamp() - start) // 3600)
            if 0 <= index < 24:
                expected[index][outcome] = expected[index].get(outcome, 0) + 1
    assert [b["outcomes"] for b in timeline["buckets"]] == expected
    # oldest first; the failure 30 h ago is outside the window
    assert [b["reasons"] for b in timeline["buckets"] if b["reasons"]] == [
        {"rolled_back": 1},
        {"boom": 1},
    ]
    assert sum(b["bytes_downloaded"] for b in timeline["buckets"]) == 30
    assert client.get("/v1/fleet/timeline", params={"buckets": 0}).status_code == 422


def test_device_search(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage, upto=2)
    creds = {
        "kitchen-eu-1": enroll(client, "kitchen-eu-1", region="eu", ring="beta"),
        "kitchen-us-1": enroll(client, "kitchen-us-1", region="us"),
        "car_eu_7": enroll(client, "car_eu_7", region="eu"),
    }
    report(
        client,
        "kitchen-eu-1",
        creds["kitchen-eu-1"],
        outcome="updated",
        to_version=2,
        to_digest=lineage.digests[2],
    )
    report(
        client,
        "car_eu_7",
        creds["car_eu_7"],
        outcome="failed",
        reason="download_failed",
        from_version=1,
        from_digest=lineage.digests[1],
    )

    def ids(q: str) -> list[str]:
        r = client.get("/v1/fleet/devices", params={"q": q})
        assert r.status_code == 200, r.text
        return [d["id"] for d in r.json()]

    assert ids("") == ["car_eu_7", "kitchen-eu-1", "kitchen-us-1"]
    assert ids("KITCHEN") == ["kitchen-eu-1", "kitchen-us-1"]
    assert ids("region=eu") == ["car_eu_7", "kitchen-eu-1"]
    assert ids("region=eu ring=beta") == ["kitchen-eu-1"]
    assert ids("v2") == ids("version:2") == ["kitchen-eu-1"]
    assert ids("model:asr outcome:failed") == ["car_eu_7"]
    assert ids("_eu_") == ["car_eu_7"]  # LIKE wildcards are escaped
    assert ids("%") == []
    assert ids("nobody") == []
    found = client.get("/v1/fleet/devices", params={"q": "car"}).json()
    assert found[0]["version"] == 1 and found[0]["last_outcome"] == "failed"
    assert client.get("/v1/fleet/devices", params={"q": "version:x"}).status_code == 400
    assert client.get("/v1/fleet/devices", params={"limit": 1}).json()[0]["id"] == "car_eu_7"


def test_admin_token_is_not_needed_for_the_page(client: TestClient) -> None:
    assert client.get(
        "/dashboard/", headers={"Authorization": ""}, follow_redirects=True
    ).url.path == ("/dashboard")
    assert ADMIN_TOKEN not in client.get("/dashboard").text
