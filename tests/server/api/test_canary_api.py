"""A release's canary bundle over the API: attached (stored, signed, audited), replaced
and removed; every bad attach a 4xx with nothing stored; and plans that name the canary
to agents that ask for it, and leave it out for older agents."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from device_agent.trust import TrustedMetadata
from diffs.canary import FORMAT, CanaryClip, write_canary
from diffs.model import Tensor, save_model
from diffs.wire import UpdatePlan
from tests.lineage import Lineage
from tests.server.api.conftest import ENROLL_SECRET, publish_lineage
from tests.server.api.test_publish import stored


def bundle(tmp_path: Path, max_wer: float = 0.3, name: str = "canary") -> bytes:
    rng = np.random.default_rng(3)
    clips = [
        CanaryClip(
            "clip-0000", "turn on the lights", (rng.standard_normal(3200) * 900).astype(np.int16)
        ),
        CanaryClip("clip-0001", "call mom", (rng.standard_normal(1600) * 900).astype(np.int16)),
    ]
    path = tmp_path / f"{name}.safetensors"
    write_canary(path, clips, max_wer, {"kind": "test"})
    return path.read_bytes()


@pytest.fixture
def release_id(client: TestClient, lineage: Lineage) -> int:
    publish_lineage(client, lineage)
    r = client.post("/v1/releases", json={"model": "asr", "version": 4, "activate": True})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def attach(client: TestClient, release_id: int, body: bytes, **headers: str) -> Any:
    return client.put(f"/v1/releases/{release_id}/canary", content=body, headers=headers)


def enroll(client: TestClient, device_id: str) -> dict[str, str]:
    r = client.post(
        "/v1/devices/enroll", json={"enrollment_secret": ENROLL_SECRET, "device_id": device_id}
    )
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['credential']}"}


def poll(
    client: TestClient, device: str, headers: dict[str, str], digest: str, **params: str
) -> Any:
    return client.get(
        f"/v1/devices/{device}/update",
        params={"model": "asr", "digest": digest, **params},
        headers=headers,
    )


def model_role_version(client: TestClient) -> int:
    """The version of the model's signed role now (it grows with every signed target)."""
    timestamp = client.get("/tuf/timestamp.json").json()
    version = timestamp["signed"]["meta"]["snapshot.json"]["version"]
    snapshot = client.get(f"/tuf/{version}.snapshot.json").json()
    return int(snapshot["signed"]["meta"]["model-asr.json"]["version"])


def signed_target(client: TestClient, tmp_path: Path, path: str) -> Any:
    """The target as a device's TUF client (python-tuf ngclient) verifies it."""
    root = client.get("/v1/provisioning").json()["trusted_root"]
    trusted = TrustedMetadata(
        tmp_path / "tuf", "http://testserver/tuf/", client, json.dumps(root).encode()
    )
    trusted.refresh()
    return trusted.target(path)


def test_attach_stores_signs_and_shows_the_canary(
    client: TestClient, lineage: Lineage, release_id: int, tmp_path: Path
) -> None:
    body = bundle(tmp_path)
    sha = hashlib.sha256(body).hexdigest()
    r = attach(client, release_id, body)
    assert r.status_code == 200, r.text
    path = f"asr/canary{release_id}-{sha}.safetensors"
    expected = {
        "sha256": sha,
        "size": len(body),
        "max_wer": 0.3,
        "clips": 2,
        "target_path": path,
    }
    assert r.json()["canary"] == expected
    assert client.get(f"/v1/releases/{release_id}").json()["canary"] == expected
    assert client.get(f"/v1/blobs/{sha}").content == body
    signed = signed_target(client, tmp_path, path)
    assert (signed.length, signed.sha256) == (len(body), sha)
    assert signed.custom == {
        "kind": "canary",
        "digest": lineage.digests[4],
        "version": 4,
        "release": release_id,
    }
    entry = client.get("/v1/audit").json()[0]
    assert (entry["action"], entry["target"]) == ("release.canary", f"release/{release_id}")
    assert entry["detail"] == {"sha256": sha, "max_wer": 0.3, "clips": 2}

    # the same bundle again changes nothing; another one replaces it
    assert attach(client, release_id, body).json()["canary"] == expected
    looser = bundle(tmp_path, 1.5, "looser")
    replaced = attach(client, release_id, looser).json()["canary"]
    assert (replaced["max_wer"], replaced["sha256"]) == (1.5, hashlib.sha256(looser).hexdigest())

    removed = client.delete(f"/v1/releases/{release_id}/canary")
    assert removed.status_code == 200, removed.text
    assert removed.json()["canary"] is None
    assert client.get("/v1/audit").json()[0]["action"] == "release.canary.remove"


def test_plans_name_the_canary_to_agents_that_ask(
    client: TestClient, lineage: Lineage, release_id: int, tmp_path: Path
) -> None:
    headers = enroll(client, "dev-c")
    before = poll(client, "dev-c", headers, lineage.digests[1], canary="true")
    assert before.status_code == 200
    assert "canary" not in before.json()  # no canary yet: no key at all
    body = bundle(tmp_path)
    sha = hashlib.sha256(body).hexdigest()
    assert attach(client, release_id, body).status_code == 200

    asked = poll(client, "dev-c", headers, lineage.digests[1], canary="true")
    plan = UpdatePlan.model_validate_json(asked.content)
    assert plan.canary is not None and plan.release_id == release_id
    assert plan.canary.model_dump() == {
        "url": f"/v1/blobs/{sha}",
        "target_path": f"asr/canary{release_id}-{sha}.safetensors",
        "sha256": sha,
        "size": len(body),
        "max_wer": 0.3,
        "clips": 2,
    }
    assert asked.headers["etag"] != before.headers["etag"]  # a new canary is a new answer

    # an older agent does not ask, and gets exactly the plan it always got
    old = poll(client, "dev-c", headers, lineage.digests[1])
    assert "canary" not in old.json()
    assert old.headers["etag"] == before.headers["etag"]
    assert old.json()["options"] == asked.json()["options"]

    # a device already at the release's version has nothing to check
    current = poll(client, "dev-c", headers, lineage.digests[4], canary="true").json()
    assert current["status"] == "current" and "canary" not in current


def _not_a_bound(tmp_path: Path) -> bytes:
    path = tmp_path / "nan.safetensors"
    meta = {
        "format": FORMAT,
        "sample_rate": "16000",
        "max_wer": "nan",
        "transcripts": json.dumps({"a": "hello"}),
    }
    save_model(path, {"a": Tensor.of(np.ones(100, np.int16))}, meta)
    return path.read_bytes()


BAD_BUNDLES: dict[str, tuple[Any, int, str]] = {
    "garbage": (lambda lin, tmp: b"this is not a canary bundle", 422, "invalid_upload"),
    "a model": (lambda lin, tmp: lin.files[0].read_bytes(), 422, "invalid_upload"),
    "a diff": (lambda lin, tmp: lin.diffs[0], 422, "invalid_upload"),
    "nan bound": (lambda lin, tmp: _not_a_bound(tmp), 422, "invalid_upload"),
    "truncated": (lambda lin, tmp: bundle(tmp)[:-10], 422, "invalid_upload"),
    "empty": (lambda lin, tmp: b"", 400, "bad_request"),
    "oversize": (lambda lin, tmp: b"\0" * (4 * 1024 * 1024 + 1), 413, "payload_too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_bad_bundles_are_refused_and_nothing_stored(
    client: TestClient, lineage: Lineage, release_id: int, tmp_path: Path, case: str
) -> None:
    before = (stored(client), model_role_version(client), client.get("/v1/audit").json())
    make, status, code = BAD_BUNDLES[case]
    r = attach(client, release_id, make(lineage, tmp_path))
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert (stored(client), model_role_version(client), client.get("/v1/audit").json()) == before
    assert client.get(f"/v1/releases/{release_id}").json()["canary"] is None
    tmp = client.app.state.context.tmp_dir  # type: ignore[attr-defined]
    assert not any(tmp.rglob("*.incomplete")) if tmp.exists() else True


def test_wrong_release_or_credential_is_refused_and_nothing_stored(
    client: TestClient, release_id: int, tmp_path: Path
) -> None:
    body = bundle(tmp_path)
    before = (stored(client), model_role_version(client))
    assert attach(client, 999, body).status_code == 404
    reader = client.post("/v1/tokens", json={"name": "ro", "scopes": ["read"]}).json()["token"]
    assert attach(client, release_id, body, Authorization=f"Bearer {reader}").status_code == 403
    device = enroll(client, "dev-x")
    assert attach(client, release_id, body, **device).status_code == 401
    assert client.post(f"/v1/releases/{release_id}/halt").status_code == 200
    halted = attach(client, release_id, body)
    assert halted.status_code == 409 and "halted" in halted.json()["error"]["message"]
    assert (stored(client), model_role_version(client)) == before
    assert client.delete("/v1/releases/999/canary").status_code == 404
