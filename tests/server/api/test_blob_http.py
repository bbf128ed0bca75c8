"""Blobs over HTTP: immutable caching headers, ETag, HEAD, Range."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.server.api.conftest import Lineage, publish_lineage


def test_blob_headers_and_ranges(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage, upto=1)
    version = client.get("/v1/models/asr/versions/1").json()
    sha, size = version["diff_sha256"], version["diff_size"]
    url = f"/v1/blobs/{sha}"
    full = client.get(url, headers={"Authorization": ""})  # public: no credential needed
    assert full.status_code == 200 and len(full.content) == size == len(lineage.diffs[0])
    assert full.content == lineage.diffs[0]
    assert full.headers["etag"] == f'"{sha}"'
    assert "immutable" in full.headers["cache-control"]
    head = client.head(url)
    assert (
        head.status_code == 200
        and int(head.headers["content-length"]) == size
        and head.content == b""
    )
    part = client.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == lineage.diffs[0][10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{size}"
    tail = client.get(url, headers={"Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == lineage.diffs[0][-5:]
    assert client.get(url, headers={"If-None-Match": f'"{sha}"'}).status_code == 304
    assert client.get("/v1/blobs/" + "0" * 64).status_code == 404
    assert client.get("/v1/blobs/not-a-sha").status_code == 400
