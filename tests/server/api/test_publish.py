"""Publishing: base and diff versions, idempotence, and every bad input rejected with a
clear 4xx and nothing stored."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from diffs.container import Diff, DiffReader, diff_bytes
from server.models import BlobRow, VersionRow
from tests.server.api.conftest import Lineage, publish_lineage


def stored(client: TestClient) -> tuple[int, int, list[Path]]:
    """Rows of versions and blobs, and files in the blob directory."""
    ctx = client.app.state.context  # type: ignore[attr-defined]
    with ctx.sessions() as session:
        versions = session.scalar(select(func.count()).select_from(VersionRow))
        blobs = session.scalar(select(func.count()).select_from(BlobRow))
    root = ctx.settings.resolved_blob_dir()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
    return versions, blobs, files


def test_publish_chain_materializes_each_child(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage)
    versions = client.get("/v1/models/asr/versions").json()
    assert [v["version"] for v in versions] == [0, 1, 2, 3, 4]
    assert [v["digest"] for v in versions] == lineage.digests
    assert [v["parent"] for v in versions] == [None, 0, 1, 2, 3]
    assert versions[1]["diff_size"] == len(lineage.diffs[0])
    # the materialized child is served and is byte-for-byte a valid model of that digest
    snap = client.get(f"/v1/blobs/{versions[4]['snapshot_sha256']}")
    assert snap.status_code == 200
    from safetensors.numpy import load

    from diffs.digest import model_digest
    from diffs.model import Tensor

    loaded = load(snap.content)
    assert model_digest({k: Tensor.of(v) for k, v in loaded.items()}) == lineage.digests[4]


def test_same_content_twice_is_one_version(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage, upto=1)
    before = stored(client)
    again = client.post("/v1/models/asr/versions", content=lineage.files[0].read_bytes())
    assert again.status_code == 200 and again.json()["version"] == 0 and not again.json()["created"]
    diff_again = client.post(
        "/v1/models/asr/versions", params={"parent": 0}, content=lineage.diffs[0]
    )
    assert diff_again.status_code == 200 and diff_again.json()["version"] == 1
    assert stored(client) == before


def test_metadata_update_and_retire(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage, upto=1)
    r = client.patch(
        "/v1/models/asr/versions/1",
        json={
            "notes": "teaches names",
            "method": "sparse",
            "metrics": {"wer": 0.08},
            "retired": True,
        },
    )
    assert r.status_code == 200
    body = r.json()
    assert (body["notes"], body["method"], body["metrics"], body["retired"]) == (
        "teaches names",
        "sparse",
        {"wer": 0.08},
        True,
    )


def _wrong_target(lineage: Lineage) -> bytes:
    diff = DiffReader(lineage.diffs[0]).read()
    return diff_bytes(Diff(diff.base_digest, "sha256:" + "ab" * 32, diff.entries, diff.info))


BAD_UPLOADS = {
    "not-a-model": (None, lambda lin: b"hello, not safetensors", 422, "invalid_upload"),
    "truncated-model": (None, lambda lin: lin.files[0].read_bytes()[:-10], 422, "invalid_upload"),
    "malformed-diff": (
        0,
        lambda lin: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ",
        422,
        "invalid_upload",
    ),
    "truncated-diff": (
        0,
        lambda lin: lin.diffs[0][: len(lin.diffs[0]) // 2],
        422,
        "invalid_upload",
    ),
    "wrong-parent": (0, lambda lin: lin.diffs[1], 422, "invalid_upload"),
    "wrong-target": (0, _wrong_target, 422, "invalid_upload"),
    "unknown-parent": (7, lambda lin: lin.diffs[0], 404, "not_found"),
    "empty": (None, lambda lin: b"", 400, "bad_request"),
    "oversize": (None, lambda lin: b"\0" * (4 * 1024 * 1024 + 1), 413, "payload_too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_upload_is_rejected_and_nothing_stored(
    client: TestClient, lineage: Lineage, case: str
) -> None:
    publish_lineage(client, lineage, upto=0)
    before = stored(client)
    parent, body, status, code = BAD_UPLOADS[case]
    params = {} if parent is None else {"parent": parent}
    r = client.post("/v1/models/asr/versions", params=params, content=body(lineage))
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]
    assert stored(client) == before
    tmp = client.app.state.context.tmp_dir  # type: ignore[attr-defined]
    assert not any(tmp.rglob("*.incomplete")) if tmp.exists() else True


def test_unknown_model_and_version(client: TestClient, lineage: Lineage) -> None:
    r = client.post("/v1/models/nope/versions", content=lineage.files[0].read_bytes())
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    publish_lineage(client, lineage, upto=0)
    assert client.get("/v1/models/asr/versions/9").status_code == 404
    assert client.get("/v1/models/zzz/versions").status_code == 404


def test_model_names_are_validated(client: TestClient) -> None:
    assert client.post("/v1/models", json={"name": "Bad Name!"}).status_code == 422
    assert client.post("/v1/models", json={"name": "ok-name"}).status_code == 201
    assert client.post("/v1/models", json={"name": "ok-name"}).status_code == 409
