"""A content-addressed blob directory: the embedded configuration's blob store.

Layout: ``root/ab/cd/<sha256>`` where ``ab`` and ``cd`` are the first four hex digits
of the digest (a two-level fan-out keeps directories small).

Invariants:

- A name is a SHA-256 hex digest (64 lowercase hex characters) or it is rejected with
  :class:`~server.errors.BadRequestError` before any path is built, so no name can reach
  outside ``root``.
- A blob file is complete or absent. Writers fill a temporary file in the blob's own
  directory, fsync it, ``os.replace`` it into place and fsync the directory. Temporary
  files are dot-files ending in ``.incomplete``; a crash can leave one behind, never a
  partial blob.
- Blobs are never rewritten: ``put_file`` of a blob that exists leaves it alone, so
  concurrent puts of the same blob are safe (the last rename wins; the bytes are equal).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from server.blobs import CHUNK_BYTES
from server.errors import BadRequestError, BlobStoreError, NotFoundError

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_BLOB_MODE = 0o644


def require_sha256(sha256: str) -> str:
    """``sha256`` itself if it is 64 lowercase hex characters; BadRequestError otherwise."""
    if _SHA256_HEX.fullmatch(sha256) is None:
        raise BadRequestError(f"not a sha256 hex digest: {sha256!r:.80}")
    return sha256


def check_range(start: int, end: int | None, size: int) -> int:
    """The end of ``[start, end)`` within a blob of ``size`` bytes; BadRequestError if outside."""
    stop = size if end is None else end
    if not 0 <= start <= stop <= size:
        raise BadRequestError(f"range [{start}, {end}) is outside a blob of {size} bytes")
    return stop


class LocalBlobStore:
    """Blobs as files under ``root`` (created on first write)."""

    def __init__(self, root: Path, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.root = Path(root)
        self.chunk_bytes = chunk_bytes

    def path_for(self, sha256: str) -> Path:
        """Where blob ``sha256`` lives (whether or not it exists)."""
        name = require_sha256(sha256)
        return self.root / name[0:2] / name[2:4] / name

    def put_file(self, path: Path, sha256: str, size: int, *, move: bool = False) -> None:
        """Store ``path`` as blob ``sha256``; with ``move``, the file is consumed.

        A stored blob of the right size is left alone (one of another size can only be
        damage, and is replaced). ``move`` renames the file into the store when it is on
        the same file system (no copy), and removes it when the blob is already stored.
        """
        dest = self.path_for(sha256)
        source = Path(path)
        actual = _file_size(source)
        if actual != size:
            raise BadRequestError(f"{source} holds {actual} bytes, expected {size}")
        if _stored_size(dest) == size:
            if move and not _same_file(source, dest):
                source.unlink(missing_ok=True)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move and _rename_into(source, dest):
            return
        _copy_atomically(source, dest)
        if move:
            source.unlink(missing_ok=True)

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def size(self, sha256: str) -> int:
        path = self.path_for(sha256)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"blob {sha256} not found") from None

    def iter_range(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Chunks of at most ``chunk_bytes``; a missing blob or bad range raises at the call."""
        stop = check_range(start, end, self.size(sha256))
        return self._read_chunks(sha256, start, stop)

    def _read_chunks(self, sha256: str, start: int, stop: int) -> Iterator[bytes]:
        if start == stop:
            return
        try:
            handle = self.path_for(sha256).open("rb")
        except FileNotFoundError:  # deleted since iter_range looked
            raise NotFoundError(f"blob {sha256} not found") from None
        with handle:
            handle.seek(start)
            remaining = stop - start
            while remaining > 0:
                chunk = handle.read(min(self.chunk_bytes, remaining))
                if not chunk:
                    raise BlobStoreError(f"blob {sha256} ended before byte {stop}")
                remaining -= len(chunk)
                yield chunk

    def local_path(self, sha256: str) -> Path | None:
        path = self.path_for(sha256)
        return path if path.is_file() else None

    def fetch_to(self, sha256: str, dest: Path) -> None:
        source = self.path_for(sha256)
        if not source.is_file():
            raise NotFoundError(f"blob {sha256} not found")
        try:
            _copy_atomically(source, Path(dest))
        except FileNotFoundError:
            if not source.is_file():
                raise NotFoundError(f"blob {sha256} not found") from None
            raise

    def delete(self, sha256: str) -> None:
        """Remove the blob; deleting a missing blob does nothing."""
        self.path_for(sha256).unlink(missing_ok=True)


def _stored_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise BadRequestError(f"no file to store at {path}") from None


def _rename_into(source: Path, dest: Path) -> bool:
    """Move ``source`` to ``dest`` durably; False when they are on different file systems."""
    with source.open("rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(source, _BLOB_MODE)
    try:
        os.replace(source, dest)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return False
        raise
    _fsync_dir(dest.parent)
    return True


def _copy_atomically(source: Path, dest: Path) -> None:
    """Copy ``source`` to ``dest`` through a fsynced temporary file and ``os.replace``."""
    fd, tmp_name = tempfile.mkstemp(
        dir=dest.parent, prefix=f".{dest.name[:16]}.", suffix=".incomplete"
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        shutil.copyfile(source, tmp)  # sendfile on Linux: no copy through Python
        with tmp.open("rb") as handle:
            os.fchmod(handle.fileno(), _BLOB_MODE)
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
