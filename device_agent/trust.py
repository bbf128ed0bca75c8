"""Trusting what the server offers: python-tuf's ngclient, over the agent's HTTP client.

A plan is only a hint: each of its steps must be a target that the signed metadata
lists, with the same length and SHA-256, before a byte is downloaded. ngclient keeps
every TUF check (signatures, thresholds, version rollback, expiry, length caps on the
metadata itself); this module wraps its errors into :class:`TrustError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from device_agent.errors import TrustError

CHUNK = 1 << 16


class HttpxFetcher(FetcherInterface):
    """ngclient's network access through the agent's ``httpx.Client``."""

    def __init__(self, client: httpx.Client) -> None:
        self._client = client

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._client.send(self._client.build_request("GET", url), stream=True)
        except httpx.HTTPError as exc:
            raise tuf_errors.DownloadError(f"cannot fetch {url}: {exc}") from exc
        if response.status_code != 200:
            response.close()
            raise tuf_errors.DownloadHTTPError(
                f"{url}: HTTP {response.status_code}", response.status_code
            )

        def chunks() -> Iterator[bytes]:
            try:
                yield from response.iter_bytes(CHUNK)
            except httpx.HTTPError as exc:
                raise tuf_errors.DownloadError(f"connection lost fetching {url}") from exc
            finally:
                response.close()

        return chunks()


@dataclass(frozen=True)
class SignedTarget:
    path: str
    length: int
    sha256: str
    custom: dict[str, Any]


class TrustedMetadata:
    """The device's view of the signed metadata; :meth:`refresh` once per update cycle."""

    def __init__(
        self, metadata_dir: Path, metadata_url: str, client: httpx.Client, trusted_root: bytes
    ) -> None:
        self._dir = metadata_dir
        self._url = metadata_url
        self._fetcher = HttpxFetcher(client)
        self._trusted_root = trusted_root
        self._updater: Updater | None = None

    def refresh(self) -> None:
        """Fetch and verify the latest metadata (raises :class:`TrustError`)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        bootstrap = None if (self._dir / "root.json").exists() else self._trusted_root
        try:
            updater = Updater(
                str(self._dir),
                self._url,
                fetcher=self._fetcher,
                config=UpdaterConfig(),
                bootstrap=bootstrap,
            )
            updater.refresh()
        except tuf_errors.RepositoryError as exc:
            raise TrustError(f"signed metadata refused: {type(exc).__name__}: {exc}") from exc
        except tuf_errors.DownloadError as exc:
            raise TrustError(f"cannot fetch signed metadata: {exc}") from exc
        self._updater = updater

    def target(self, path: str) -> SignedTarget:
        """The signed facts of ``path``; :class:`TrustError` if it is not a signed target."""
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        try:
            info = self._updater.get_targetinfo(path)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            raise TrustError(f"signed metadata refused for {path}: {exc}") from exc
        if info is None:
            raise TrustError(f"{path} is not a signed target")
        sha256 = info.hashes.get("sha256")
        if sha256 is None:
            raise TrustError(f"{path} is signed without a sha256")
        return SignedTarget(path, info.length, sha256, dict(info.custom))
