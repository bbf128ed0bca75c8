"""Everything a request handler needs, built once by the app factory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from diffs.limits import DecodeLimits
from server.blobs import BlobStore
from server.catalog import Catalog
from server.settings import Settings
from server.trust.repository import TrustRepository
from server.trust.setup import RefreshThrottle


@dataclass
class ServiceContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    trust: TrustRepository
    catalog: Catalog
    trust_refresh: RefreshThrottle
    tmp_dir: Path
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    composed_cache: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)
    signed_paths: set[str] = field(default_factory=set)
    """Target paths this worker has signed on demand (rollback steps)."""


def snapshot_path(model: str, sha256: str) -> str:
    """The signed target path of a full snapshot (TUF paths are ``<model>/<file>``)."""
    return f"{model}/snapshot-{sha256}.safetensors"


def diff_path(model: str, sha256: str) -> str:
    return f"{model}/diff-{sha256}.diff"


def composed_path(model: str, sha256: str) -> str:
    return f"{model}/composed-{sha256}.diff"


def canary_path(model: str, release_id: int, sha256: str) -> str:
    """A release's canary bundle: signed per release (with the digest it checks), so one
    bundle attached to two releases is two targets."""
    return f"{model}/canary{release_id}-{sha256}.safetensors"


def blob_url(sha256: str) -> str:
    return f"/v1/blobs/{sha256}"
