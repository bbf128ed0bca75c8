"""Where signed metadata files live: every version of every role, append-only.

Invariants every store keeps:

- ``(role, version)`` names at most one body, ever: a file a device may have fetched
  is never replaced. A second writer of the same ``(role, version)`` gets
  :class:`MetadataVersionConflictError` — never a silent overwrite.
- :meth:`MetadataStore.put_many` is all or nothing: one publish (a delegated role, the
  top-level targets, snapshot and timestamp) is visible entirely or not at all.

Two server replicas publishing at once therefore cannot produce two different files
with the same name: the loser's whole batch is refused, and
:class:`server.trust.repository.TrustRepository` re-reads and retries.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.db import transaction
from server.errors import ConflictError, NotFoundError
from server.models import TufMetadataRow


class MetadataVersionConflictError(ConflictError):
    """Another writer already stored a file with this ``(role, version)``."""


class MetadataFile(NamedTuple):
    role: str
    version: int
    body: bytes


class MetadataStore(Protocol):
    """Append-only storage of signed metadata files, by role and version."""

    def put(self, role: str, version: int, body: bytes) -> None:
        """Store one file; :class:`MetadataVersionConflictError` if it exists."""
        ...

    def put_many(self, files: Sequence[MetadataFile]) -> None:
        """Store files atomically: all of them, or none and a conflict error."""
        ...

    def get(self, role: str, version: int | None = None) -> bytes:
        """The given version, or the latest; :class:`NotFoundError` if absent."""
        ...

    def latest_version(self, role: str) -> int:
        """The highest stored version of ``role``; 0 when there is none."""
        ...


class MemoryMetadataStore:
    """A store in a dict, for tests and single-process tools. Thread-safe."""

    def __init__(self) -> None:
        self._files: dict[str, dict[int, bytes]] = {}
        self._lock = threading.Lock()

    def put(self, role: str, version: int, body: bytes) -> None:
        self.put_many([MetadataFile(role, version, body)])

    def put_many(self, files: Sequence[MetadataFile]) -> None:
        _check_batch(files)
        with self._lock:
            for file in files:
                if file.version in self._files.get(file.role, {}):
                    raise MetadataVersionConflictError(f"{file.role} v{file.version} exists")
            for file in files:
                self._files.setdefault(file.role, {})[file.version] = bytes(file.body)

    def get(self, role: str, version: int | None = None) -> bytes:
        with self._lock:
            versions = self._files.get(role, {})
            if version is None:
                version = max(versions, default=0)
            try:
                return versions[version]
            except KeyError:
                raise NotFoundError(f"no metadata {role} v{version}") from None

    def latest_version(self, role: str) -> int:
        with self._lock:
            return max(self._files.get(role, {}), default=0)


class SqlMetadataStore:
    """A store in the ``tuf_metadata`` table; the unique ``(role, version)`` guards races."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._sessions = session_factory

    def put(self, role: str, version: int, body: bytes) -> None:
        self.put_many([MetadataFile(role, version, body)])

    def put_many(self, files: Sequence[MetadataFile]) -> None:
        _check_batch(files)
        try:
            with transaction(self._sessions) as session:
                session.add_all(
                    TufMetadataRow(role=f.role, version=f.version, body=f.body) for f in files
                )
        except IntegrityError as exc:
            names = ", ".join(f"{f.role} v{f.version}" for f in files)
            raise MetadataVersionConflictError(f"another writer stored one of {names}") from exc

    def get(self, role: str, version: int | None = None) -> bytes:
        query = select(TufMetadataRow.body).where(TufMetadataRow.role == role)
        if version is None:
            query = query.order_by(TufMetadataRow.version.desc()).limit(1)
        else:
            query = query.where(TufMetadataRow.version == version)
        with self._sessions() as session:
            body = session.scalars(query).first()
        if body is None:
            raise NotFoundError(f"no metadata {role} v{version or 'latest'}")
        return body

    def latest_version(self, role: str) -> int:
        query = select(func.max(TufMetadataRow.version)).where(TufMetadataRow.role == role)
        with self._sessions() as session:
            latest = session.scalar(query)
        return latest or 0


def _check_batch(files: Sequence[MetadataFile]) -> None:
    names = [(f.role, f.version) for f in files]
    if len(set(names)) != len(names):
        raise ValueError("a batch names the same (role, version) twice")
    for role, version in names:
        if version < 1:
            raise ValueError(f"{role}: metadata versions start at 1, got {version}")
