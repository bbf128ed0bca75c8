"""A per-worker, read-mostly view of what is published: models and their versions.

Polls are answered from this view, so an up-to-date device costs no database query.
The view of a model is reloaded at most every ``ttl`` seconds (by one thread at a time),
and at once by the worker that publishes to it; other workers (replicas) see a publish
within ``ttl``. Each view also memoizes the serialized poll answers computed from it, so
a poll from a known version is answered without building or serializing a plan again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from server.models import BlobRow, ModelRow, ReleaseRow, VersionRow
from server.planning import VersionNode
from server.releases import view_of
from server.targeting import GOVERNING_STATES, GoverningRelease


@dataclass(frozen=True)
class PlanAnswer:
    """A poll's answer, serialized once: its ``ETag`` and its JSON body."""

    etag: str
    body: bytes
    status: str
    """The plan's status: ``current`` or ``update``."""
    cheapest: str | None
    """The kind of the plan's first (cheapest) option; ``None`` when there is none."""


AnswerKey = tuple[str | None, int | None, int | None, bool]
"""(device digest, target version id, release id, whether the agent runs canary checks)."""


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
    releases: tuple[GoverningRelease, ...] | None = None
    """The model's active, paused and completed releases; ``None`` if it never had one."""
    answers: dict[AnswerKey, PlanAnswer] = field(default_factory=dict, compare=False, repr=False)
    """Poll answers by :data:`AnswerKey`, for the digests of this model's versions (and
    none)."""


@dataclass
class Catalog:
    sessions: sessionmaker[Session]
    ttl: float
    clock: Callable[[], float] = time.monotonic
    _views: dict[str, tuple[float, ModelView | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loading: threading.Lock = field(default_factory=threading.Lock)

    def model(self, name: str) -> ModelView | None:
        """The view of ``name`` (``None``: no such model), reloaded if older than ``ttl``."""
        fresh = self._fresh(name)
        if fresh is not None:
            return fresh[0]
        with self._loading:  # one reload at a time: the threads behind it reuse its view
            fresh = self._fresh(name)
            if fresh is not None:
                return fresh[0]
            now = self.clock()
            view = self._load(name)
            with self._lock:
                self._views[name] = (now, view)
            return view

    def cached(self, name: str) -> ModelView | None:
        """The view of ``name`` if it is fresh and is a model; never queries the database
        (so it may be called from the event loop)."""
        fresh = self._fresh(name)
        return fresh[0] if fresh is not None else None

    def _fresh(self, name: str) -> tuple[ModelView | None] | None:
        cached = self._views.get(name)
        if cached is not None and self.clock() - cached[0] < self.ttl:
            return (cached[1],)
        return None

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
            release_rows = list(
                session.scalars(
                    select(ReleaseRow)
                    .where(ReleaseRow.model_id == model.id)
                    .options(selectinload(ReleaseRow.canary))
                )
            )
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
            releases=None
            if not release_rows
            else tuple(
                GoverningRelease(view_of(r), r.state)
                for r in release_rows
                if r.state in GOVERNING_STATES
            ),
        )
