"""The BlobStore contract, run against the local directory store and SeaweedFS S3."""

from __future__ import annotations

import hashlib
import os
import threading
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from server.blobs import CHUNK_BYTES, BlobStore
from server.blobs.factory import make_blob_store
from server.blobs.local import LocalBlobStore
from server.errors import BadRequestError, BlobStoreError, NotFoundError
from server.settings import Settings
from tests.server.conftest import s3_store
from tests.server.seaweed import S3Endpoint, free_ports

# Every test writes random bytes, so tests sharing the session's bucket never collide.


def write_blob(directory: Path, data: bytes) -> tuple[Path, str]:
    path = directory / f"upload-{uuid.uuid4().hex}"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def stored(store: BlobStore, tmp_path: Path, data: bytes) -> str:
    path, sha = write_blob(tmp_path, data)
    store.put_file(path, sha, len(data))
    return sha


def read_all(store: BlobStore, sha: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join(store.iter_range(sha, start, end))


MISSING = hashlib.sha256(b"never stored").hexdigest()


def test_put_then_exists_size_and_read(blob_store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(3000)
    path, sha = write_blob(tmp_path, data)
    assert not blob_store.exists(sha)
    blob_store.put_file(path, sha, len(data))
    assert blob_store.exists(sha)
    assert blob_store.size(sha) == len(data)
    assert read_all(blob_store, sha) == data
    assert path.read_bytes() == data  # put copies; the caller's file is untouched


def test_put_is_idempotent(blob_store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(5000)
    sha = stored(blob_store, tmp_path, data)
    again, _ = write_blob(tmp_path, data)
    blob_store.put_file(again, sha, len(data))
    blob_store.put_file(again, sha, len(data))
    assert blob_store.size(sha) == len(data)
    assert read_all(blob_store, sha) == data


def test_put_checks_the_declared_size(blob_store: BlobStore, tmp_path: Path) -> None:
    path, sha = write_blob(tmp_path, b"twelve bytes")
    with pytest.raises(BadRequestError):
        blob_store.put_file(path, sha, 13)
    with pytest.raises(BadRequestError):
        blob_store.put_file(tmp_path / "absent", sha, 12)
    assert not blob_store.exists(sha)


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, None),  # all of it
        (0, 1000),  # all of it, end given
        (10, 100),  # the middle
        (993, None),  # a suffix
        (999, 1000),  # the last byte
        (0, 1),  # the first byte
        (400, 400),  # nothing, inside
        (1000, None),  # nothing, at the end
        (1000, 1000),
    ],
)
def test_iter_range(blob_store: BlobStore, tmp_path: Path, start: int, end: int | None) -> None:
    data = os.urandom(1000)
    sha = stored(blob_store, tmp_path, data)
    assert read_all(blob_store, sha, start, end) == data[start:end]


@pytest.mark.parametrize(("start", "end"), [(-1, None), (0, 1001), (1001, None), (20, 10)])
def test_iter_range_outside_the_blob(
    blob_store: BlobStore, tmp_path: Path, start: int, end: int | None
) -> None:
    sha = stored(blob_store, tmp_path, os.urandom(1000))
    with pytest.raises(BadRequestError):
        blob_store.iter_range(sha, start, end)  # raises at the call, before any byte


def test_empty_blob(blob_store: BlobStore, tmp_path: Path) -> None:
    sha = stored(blob_store, tmp_path, b"")
    assert sha == hashlib.sha256(b"").hexdigest()
    assert blob_store.exists(sha)
    assert blob_store.size(sha) == 0
    assert read_all(blob_store, sha) == b""
    assert read_all(blob_store, sha, 0, 0) == b""
    dest = tmp_path / "empty.out"
    blob_store.fetch_to(sha, dest)
    assert dest.read_bytes() == b""
    blob_store.delete(sha)
    assert not blob_store.exists(sha)


def test_fetch_to_replaces_the_destination(blob_store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(70_000)
    sha = stored(blob_store, tmp_path, data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / "model.safetensors"
    dest.write_bytes(b"an older file")
    blob_store.fetch_to(sha, dest)
    assert dest.read_bytes() == data
    assert [p.name for p in out_dir.iterdir()] == [dest.name]  # no temporary file left


def test_delete(blob_store: BlobStore, tmp_path: Path) -> None:
    sha = stored(blob_store, tmp_path, os.urandom(100))
    blob_store.delete(sha)
    assert not blob_store.exists(sha)
    assert blob_store.local_path(sha) is None
    with pytest.raises(NotFoundError):
        blob_store.size(sha)
    blob_store.delete(sha)  # deleting what is gone is not an error


def test_missing_blob(blob_store: BlobStore, tmp_path: Path) -> None:
    assert not blob_store.exists(MISSING)
    assert blob_store.local_path(MISSING) is None
    with pytest.raises(NotFoundError):
        blob_store.size(MISSING)
    with pytest.raises(NotFoundError):
        blob_store.iter_range(MISSING)  # at the call, not at the first chunk
    with pytest.raises(NotFoundError):
        blob_store.iter_range(MISSING, 0, 0)
    dest = tmp_path / "dest"
    with pytest.raises(NotFoundError):
        blob_store.fetch_to(MISSING, dest)
    assert list(tmp_path.iterdir()) == []  # neither dest nor a temporary file


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../../../../etc/passwd",
        "ab/../../" + "0" * 55,
        MISSING.upper(),
        MISSING[:-1],
        MISSING + "0",
        MISSING[:-1] + "g",
        MISSING + "\n",
        "/" + MISSING[1:],
    ],
)
def test_bad_names_are_rejected(blob_store: BlobStore, tmp_path: Path, name: str) -> None:
    path, _ = write_blob(tmp_path, b"x")
    calls: list[Callable[[], object]] = [
        lambda: blob_store.put_file(path, name, 1),
        lambda: blob_store.exists(name),
        lambda: blob_store.size(name),
        lambda: blob_store.iter_range(name),
        lambda: blob_store.local_path(name),
        lambda: blob_store.fetch_to(name, tmp_path / "dest"),
        lambda: blob_store.delete(name),
    ]
    for call in calls:
        with pytest.raises(BadRequestError):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_large_blob_is_streamed_in_bounded_chunks(blob_store: BlobStore, tmp_path: Path) -> None:
    size = 20 * 1024 * 1024 + 12_345
    path = tmp_path / "large"
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(0, size, CHUNK_BYTES):
            piece = os.urandom(min(CHUNK_BYTES, size - out.tell()))
            digest.update(piece)
            out.write(piece)
    sha = digest.hexdigest()
    blob_store.put_file(path, sha, size)
    assert blob_store.size(sha) == size

    tracemalloc.start()
    try:
        seen = hashlib.sha256()
        total = largest = 0
        for chunk in blob_store.iter_range(sha):
            seen.update(chunk)
            total += len(chunk)
            largest = max(largest, len(chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (total, seen.hexdigest()) == (size, sha)
    assert largest <= CHUNK_BYTES
    assert peak < 4 * CHUNK_BYTES, f"reading held {peak} bytes at once"

    tail = read_all(blob_store, sha, size - 3 * CHUNK_BYTES - 7)
    with path.open("rb") as source:
        source.seek(size - 3 * CHUNK_BYTES - 7)
        assert tail == source.read()

    dest = tmp_path / "large.out"
    blob_store.fetch_to(sha, dest)
    assert dest.stat().st_size == size
    assert _file_sha256(dest) == sha


def test_concurrent_puts_of_one_blob(blob_store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK_BYTES + 17)
    sha = hashlib.sha256(data).hexdigest()
    sources = [write_blob(tmp_path, data)[0] for _ in range(8)]
    barrier = threading.Barrier(len(sources))
    errors: list[BaseException] = []

    def put(source: Path) -> None:
        try:
            barrier.wait()
            blob_store.put_file(source, sha, len(data))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(source,)) for source in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert blob_store.size(sha) == len(data)
    assert read_all(blob_store, sha) == data


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# --- the local store's own promises --------------------------------------------------------


def test_local_layout_and_local_path(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(64)
    sha = stored(store, tmp_path, data)
    expected = tmp_path / "blobs" / sha[:2] / sha[2:4] / sha
    assert store.local_path(sha) == expected
    assert expected.read_bytes() == data
    assert expected.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in expected.parent.iterdir()] == [sha]  # no temporary file left


def test_local_put_leaves_a_stored_blob_alone(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(64)
    sha = stored(store, tmp_path, data)
    before = os.stat(store.path_for(sha))
    stored(store, tmp_path, data)
    after = os.stat(store.path_for(sha))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_local_put_repairs_a_damaged_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(64)
    sha = stored(store, tmp_path, data)
    store.path_for(sha).write_bytes(data[:10])  # truncated by some accident
    stored(store, tmp_path, data)
    assert read_all(store, sha) == data


def test_local_put_with_move_consumes_the_file(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(500)
    path, sha = write_blob(tmp_path, data)
    inode = path.stat().st_ino
    store.put_file(path, sha, len(data), move=True)
    assert not path.exists()
    assert store.path_for(sha).stat().st_ino == inode  # renamed, not copied
    again, _ = write_blob(tmp_path, data)
    store.put_file(again, sha, len(data), move=True)  # already stored: just removed
    assert not again.exists()
    own = store.path_for(sha)
    store.put_file(own, sha, len(data), move=True)  # the stored file itself: kept
    assert read_all(store, sha) == data


def test_local_chunk_size_is_bounded(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs", chunk_bytes=100)
    data = os.urandom(1050)
    sha = stored(store, tmp_path, data)
    chunks = list(store.iter_range(sha, 25, 1040))
    assert b"".join(chunks) == data[25:1040]
    assert [len(c) for c in chunks] == [100] * 10 + [15]


# --- the S3 store's own promises ---------------------------------------------------------------


def test_s3_creates_its_bucket_on_first_write(seaweedfs_s3: S3Endpoint, tmp_path: Path) -> None:
    store = s3_store(seaweedfs_s3, f"diffcast-fresh-{uuid.uuid4().hex[:12]}")
    assert not store.exists(MISSING)  # reads of a bucket not made yet: just missing
    with pytest.raises(NotFoundError):
        store.iter_range(MISSING)
    sha = stored(store, tmp_path, b"first blob")
    assert read_all(store, sha) == b"first blob"
    assert store.local_path(sha) is None


def test_s3_wrong_key_is_a_blob_store_error(seaweedfs_s3: S3Endpoint, tmp_path: Path) -> None:
    wrong = S3Endpoint(seaweedfs_s3.endpoint, seaweedfs_s3.access_key, "not-the-secret")
    store = s3_store(wrong, "diffcast-denied")
    with pytest.raises(BlobStoreError):
        stored(store, tmp_path, b"denied")


def test_s3_unreachable_is_a_blob_store_error(tmp_path: Path) -> None:
    (port,) = free_ports(1)  # nothing listens there
    store = s3_store(S3Endpoint(f"http://127.0.0.1:{port}", "key", "secret"), "diffcast-none")
    with pytest.raises(BlobStoreError):
        store.exists(MISSING)
    with pytest.raises(BlobStoreError):
        stored(store, tmp_path, b"nowhere")


# --- the factory ---------------------------------------------------------------------------


def test_factory_makes_a_local_store_by_default(tmp_path: Path) -> None:
    store = make_blob_store(Settings(data_dir=tmp_path))
    assert isinstance(store, LocalBlobStore)
    assert store.root == tmp_path / "blobs"


def test_factory_makes_an_s3_store(seaweedfs_s3: S3Endpoint, tmp_path: Path) -> None:
    from server.blobs.s3 import S3BlobStore

    settings = Settings(
        data_dir=tmp_path,
        blob_store="s3",
        s3_endpoint=seaweedfs_s3.endpoint,
        s3_bucket=f"diffcast-factory-{uuid.uuid4().hex[:12]}",
        s3_access_key=seaweedfs_s3.access_key,
        s3_secret_key=seaweedfs_s3.secret_key,
    )
    store = make_blob_store(settings)
    assert isinstance(store, S3BlobStore)
    sha = stored(store, tmp_path, b"made by the factory")
    assert store.size(sha) == len(b"made by the factory")


def test_factory_needs_s3_endpoint_and_keys(tmp_path: Path) -> None:
    with pytest.raises(BlobStoreError, match="DIFFCAST_S3_ENDPOINT"):
        make_blob_store(Settings(data_dir=tmp_path, blob_store="s3", s3_access_key="k"))
