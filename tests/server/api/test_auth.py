"""Operator tokens: scopes, hashing, revocation; a device credential is no operator."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select

from server.models import ApiTokenRow
from tests.server.api.conftest import ENROLL_SECRET


def token(client: TestClient, *scopes: str) -> dict[str, str]:
    r = client.post("/v1/tokens", json={"name": "t", "scopes": list(scopes)})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def test_missing_and_unknown_tokens(client: TestClient) -> None:
    r = client.get("/v1/models", headers={"Authorization": ""})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Basic abc"}).status_code == 401


def test_scopes(client: TestClient) -> None:
    reader = token(client, "read")
    publisher = token(client, "publish")
    assert client.get("/v1/models", headers=reader).status_code == 200
    assert client.post("/v1/models", json={"name": "m"}, headers=reader).status_code == 403
    assert client.post("/v1/models", json={"name": "m"}, headers=publisher).status_code == 201
    assert client.get("/v1/models", headers=publisher).status_code == 200
    assert (
        client.post(
            "/v1/tokens", json={"name": "x", "scopes": ["admin"]}, headers=publisher
        ).status_code
        == 403
    )


def test_tokens_are_stored_hashed_and_revocable(client: TestClient) -> None:
    r = client.post("/v1/tokens", json={"name": "ci", "scopes": ["read"]})
    secret, token_id = r.json()["token"], r.json()["id"]
    ctx = client.app.state.context  # type: ignore[attr-defined]
    with ctx.sessions() as session:
        hashes = list(session.scalars(select(ApiTokenRow.token_hash)))
    assert secret not in hashes and all(len(h) == 64 for h in hashes)
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.get("/v1/models", headers=headers).status_code == 200
    assert client.delete(f"/v1/tokens/{token_id}").status_code == 204
    assert client.get("/v1/models", headers=headers).status_code == 401


def test_device_credential_is_not_an_operator_token(client: TestClient) -> None:
    r = client.post(
        "/v1/devices/enroll", json={"enrollment_secret": ENROLL_SECRET, "device_id": "d1"}
    )
    device = {"Authorization": f"Bearer {r.json()['credential']}"}
    for method, path in [
        ("get", "/v1/models"),
        ("post", "/v1/models"),
        ("get", "/v1/devices"),
        ("get", "/v1/tokens"),
        ("get", "/v1/releases"),
        ("post", "/v1/releases"),
        ("post", "/v1/releases/1/pause"),
        ("get", "/v1/audit"),
        ("get", "/v1/fleet/summary"),
        ("get", "/v1/provisioning"),
        ("post", "/v1/trust/root"),
    ]:
        assert client.request(method, path, headers=device, json={"name": "x"}).status_code == 401
