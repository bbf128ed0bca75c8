"""Resumable, length-capped, hash-checked downloads into a state directory.

A blob is streamed to ``<name>.incomplete``; after a dropped connection the next attempt
resumes with ``Range: bytes=<have>-`` (and starts over if the server answers 200 instead
of 206); every byte received before a drop is kept. The signed length is enforced while
streaming -- one byte more and the download stops -- and the file is renamed into place
only when its SHA-256 is the signed one. Attempts that bring no new byte are capped (in a
row), so a broken network can never become a download loop, while a flaky one that keeps
making progress is followed to the end (at most the signed length).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from device_agent.errors import DownloadError, HashMismatchError, LengthExceededError


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    bytes_transferred: int
    """Bytes received over the network in this call (resumed bytes not counted again)."""
    attempts: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    client: httpx.Client,
    url: str,
    dest: Path,
    *,
    length: int,
    sha256: str,
    max_attempts: int = 5,
    backoff: float = 0.2,
    sleep: Callable[[float], None] = time.sleep,
) -> DownloadResult:
    """Fetch ``url`` into ``dest``: exactly ``length`` bytes whose SHA-256 is ``sha256``.

    Gives up after ``max_attempts`` attempts in a row that received no new byte.
    """
    if dest.exists() and dest.stat().st_size == length and _sha256(dest) == sha256:
        return DownloadResult(dest, 0, 0)
    partial = dest.with_name(dest.name + ".incomplete")
    transferred = 0
    last_error: Exception | None = None
    attempt = stalls = 0
    while stalls < max_attempts:
        attempt += 1
        have = partial.stat().st_size if partial.exists() else 0
        if have > length:
            partial.unlink()
            have = 0
        progress = _Progress()
        try:
            if have < length:
                _fetch(client, url, partial, have, length, progress)
            _finish(partial, dest, length, sha256)
            return DownloadResult(dest, transferred + progress.received, attempt)
        except (HashMismatchError, LengthExceededError):
            partial.unlink(missing_ok=True)
            raise
        except (httpx.HTTPError, OSError, DownloadError) as exc:
            last_error = exc
            transferred += progress.received
            stalls = 0 if progress.received else stalls + 1
            if stalls < max_attempts:
                sleep(backoff * 2 ** max(stalls - 1, 0))
    raise DownloadError(
        f"gave up on {url} after {max_attempts} attempts without progress: {last_error}"
    )


@dataclass
class _Progress:
    received: int = 0
    """Bytes of this attempt written to the partial file (kept for the next attempt)."""


def _fetch(
    client: httpx.Client, url: str, partial: Path, have: int, length: int, progress: _Progress
) -> None:
    """Append the missing bytes to ``partial``, counting them in ``progress``."""
    headers = {"Range": f"bytes={have}-"} if have else {}
    with client.stream("GET", url, headers=headers) as response:
        if response.status_code == 200:
            have = 0  # a full answer (the server may ignore ranges): start over
        elif response.status_code != 206 or not have:
            raise DownloadError(f"{url}: HTTP {response.status_code}")
        with open(partial, "ab" if have else "wb") as out:
            # Chunks as they arrive (no re-chunking): a re-chunker would hold back up to a
            # chunk of received bytes and lose them when the connection drops.
            for chunk in response.iter_bytes():
                if have + len(chunk) > length:
                    raise LengthExceededError(
                        f"{url} sent more than its signed length of {length} bytes"
                    )
                out.write(chunk)
                have += len(chunk)
                progress.received += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    if have != length:
        raise DownloadError(f"{url}: connection ended at {have} of {length} bytes")


def _finish(partial: Path, dest: Path, length: int, sha256: str) -> None:
    size = partial.stat().st_size
    if size != length:
        raise DownloadError(f"have {size} of {length} bytes")
    actual = _sha256(partial)
    if actual != sha256:
        raise HashMismatchError(f"downloaded bytes hash to {actual}, the signed hash is {sha256}")
    os.replace(partial, dest)
