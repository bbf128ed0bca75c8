"""Fixtures shared by the server tests: a SeaweedFS S3 endpoint and both blob stores."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.blobs import BlobStore
from server.blobs.local import LocalBlobStore
from tests.server.seaweed import S3Endpoint, SeaweedError, SeaweedS3Server


@pytest.fixture(scope="session")
def seaweedfs_s3() -> Iterator[S3Endpoint]:
    """One SeaweedFS (S3 gateway on 127.0.0.1) for the whole session."""
    server = SeaweedS3Server()
    try:
        endpoint = server.start()
    except SeaweedError as exc:
        pytest.fail(f"SeaweedFS did not start: {exc}", pytrace=False)
    try:
        yield endpoint
    finally:
        server.stop()


def s3_store(endpoint: S3Endpoint, bucket: str) -> BlobStore:
    from server.blobs.s3 import S3BlobStore

    return S3BlobStore(
        endpoint.endpoint,
        bucket,
        endpoint.access_key,
        endpoint.secret_key,
        endpoint.region,
        max_attempts=2,
    )


@pytest.fixture(scope="session")
def s3_blob_store(seaweedfs_s3: S3Endpoint) -> BlobStore:
    """One store and bucket per session: SeaweedFS gives every bucket its own volumes,
    and a boto3 client takes a while to build (it is thread-safe, so it is shared)."""
    return s3_store(seaweedfs_s3, f"diffcast-test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["local", "s3"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """Each blob store in turn: a fresh directory, or the session's bucket."""
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    store: BlobStore = request.getfixturevalue("s3_blob_store")
    return store
