"""Content-addressed blob storage: the interface the service codes against.

A blob is immutable and named by the SHA-256 of its bytes. ``put_file`` makes a blob
visible atomically (readers see all of it or nothing) and is idempotent. Implementations:
:class:`server.blobs.local.LocalBlobStore` (a directory) and
:class:`server.blobs.s3.S3BlobStore` (any S3-compatible object store).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

CHUNK_BYTES = 1 << 20


class BlobStore(Protocol):
    def put_file(self, path: Path, sha256: str, size: int) -> None:
        """Store the file at ``path`` (already hashed by the caller) as blob ``sha256``."""

    def exists(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int:
        """The blob's size; :class:`server.errors.NotFoundError` if absent."""

    def iter_range(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes ``[start, end)`` (``end`` None: to the end), in chunks, streamed."""

    def local_path(self, sha256: str) -> Path | None:
        """A local file holding the blob, if the store has one (lets the server use sendfile)."""

    def fetch_to(self, sha256: str, dest: Path) -> None:
        """Copy the blob into the local file ``dest`` (replaced atomically)."""

    def delete(self, sha256: str) -> None: ...
