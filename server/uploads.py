"""Receiving an upload: streamed to a temporary file, hashed and size-capped on the way.

The body never sits whole in memory; an upload over the cap is cut off as soon as it
passes it (and rejected up front when ``Content-Length`` already says so). The file is
removed when the :class:`Upload` context ends, whatever happened.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from server.errors import BadRequestError, PayloadTooLargeError


@dataclass
class Upload:
    path: Path
    sha256: str
    size: int

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


async def receive(
    chunks: AsyncIterator[bytes], tmp_dir: Path, max_bytes: int, declared: str | None
) -> Upload:
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadRequestError("Content-Length is not an integer") from None
        if length > max_bytes:
            raise PayloadTooLargeError(f"upload of {length} bytes exceeds the cap of {max_bytes}")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".incomplete", dir=tmp_dir)
    path = Path(name)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLargeError(f"upload exceeds the cap of {max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if size == 0:
        path.unlink(missing_ok=True)
        raise BadRequestError("the upload is empty")
    return Upload(path, digest.hexdigest(), size)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
