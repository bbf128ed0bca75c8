"""Opening the server's trust repository from settings (used by the app factory).

The embedded default needs no setup: on first start, when the keys directory is empty,
keys are generated as ``diffcast keys init`` would (with a warning that the root keys
sit beside the server and should be moved offline). The repository is initialized with
root v1 idempotently, so any number of workers or replicas may start at once.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from server.settings import Settings
from server.trust.keys import ROOT_V1_FILE, init_keys, load_online_keys
from server.trust.repository import ExpiryPolicy, TrustRepository
from server.trust.store import SqlMetadataStore

log = logging.getLogger("diffcast.server.trust")


def utc_now() -> datetime:
    return datetime.now(UTC)


def open_trust_repository(settings: Settings, sessions: sessionmaker[Session]) -> TrustRepository:
    keys_dir = settings.resolved_keys_dir()
    online_dir = keys_dir / "online"
    root_file = online_dir / ROOT_V1_FILE
    if not root_file.exists():
        log.warning(
            "no signing keys in %s: generating them (move %s offline)",
            online_dir,
            keys_dir / "root",
        )
        init_keys(online_dir, keys_dir / "root", now=utc_now())
    days = timedelta(days=settings.metadata_expiry_days)
    repository = TrustRepository(
        SqlMetadataStore(sessions),
        load_online_keys(online_dir),
        utc_now,
        ExpiryPolicy(targets=days, snapshot=days, timestamp=timedelta(days=1)),
    )
    try:
        repository.initialize(root_file.read_bytes())
    except (OperationalError, ProgrammingError) as exc:
        raise RuntimeError(
            "the database has no schema yet: run 'diffcast server migrate' "
            f"(or set DIFFCAST_MIGRATE_ON_START=true): {exc.orig}"
        ) from None
    return repository


class RefreshThrottle:
    """Re-sign expiring metadata at most once per ``interval`` seconds per worker."""

    def __init__(self, repository: TrustRepository, interval: float = 60.0) -> None:
        self._repository = repository
        self._interval = interval
        self._last = float("-inf")

    def maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._repository.refresh()
