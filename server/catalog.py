"""A per-worker, read-mostly view of what is published: models and their versions.

Polls are answered from this view, so an up-to-date device costs no database query.
The view of a model is reloaded at most every ``ttl`` seconds, and at once by the
worker that publishes to it; other workers (replicas) see a publish within ``ttl``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.models import BlobRow, ModelRow, VersionRow
from server.planning import VersionNode


@dataclass(frozen=True)
class ModelView:
    name: str
    model_id: int
    versions: dict[int, VersionNode]
    """By version id."""
    by_digest: dict[str, VersionNode]
    by_number: dict[int, VersionNode]
    latest: VersionNode | None
    """The newest version that is not retired."""


@dataclass
class Catalog:
    sessions: sessionmaker[Session]
    ttl: float
    clock: Callable[[], float] = time.monotonic
    _views: dict[str, tuple[float, ModelView | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def model(self, name: str) -> ModelView | None:
        now = self.clock()
        cached = self._views.get(name)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        view = self._load(name)
        with self._lock:
            self._views[name] = (now, view)
        return view

    def invalidate(self, name: str) -> None:
        with self._lock:
            self._views.pop(name, None)

    def _load(self, name: str) -> ModelView | None:
        with self.sessions() as session:
            model = session.scalar(select(ModelRow).where(ModelRow.name == name))
            if model is None:
                return None
            rows = session.execute(
                select(VersionRow, BlobRow.size)
                .join(BlobRow, BlobRow.sha256 == VersionRow.snapshot_sha256)
                .where(VersionRow.model_id == model.id)
                .order_by(VersionRow.number)
            ).all()
            wanted = [r.diff_sha256 for r, _ in rows if r.diff_sha256]
            diff_sizes = {
                sha: size
                for sha, size in session.execute(
                    select(BlobRow.sha256, BlobRow.size).where(BlobRow.sha256.in_(wanted))
                )
            }
        versions: dict[int, VersionNode] = {}
        latest = None
        for row, size in rows:
            node = VersionNode(
                id=row.id,
                number=row.number,
                digest=row.digest,
                parent_id=row.parent_id,
                snapshot_sha256=row.snapshot_sha256,
                snapshot_size=size,
                diff_sha256=row.diff_sha256,
                diff_size=diff_sizes.get(row.diff_sha256) if row.diff_sha256 else None,
            )
            versions[row.id] = node
            if not row.retired:
                latest = node
        return ModelView(
            name=name,
            model_id=model.id,
            versions=versions,
            by_digest={v.digest: v for v in versions.values()},
            by_number={v.number: v for v in versions.values()},
            latest=latest,
        )
