"""The ORM schema. Alembic (``migrations/``) owns it; a test checks they never drift.

Invariants:
- blobs are content-addressed (``sha256`` of their bytes) and immutable;
- a version's ``digest`` is the canonical model digest of its materialized snapshot;
  ``(model_id, digest)`` is unique, so the same content is never two versions;
- a version made from a diff has ``parent_id`` and ``diff_sha256``; a base version has
  neither;
- credentials (operator tokens, device credentials) are stored only as SHA-256 hashes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from server.db import Base


class BlobRow(Base):
    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    """snapshot, diff or composed."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    versions: Mapped[list[VersionRow]] = relationship(
        back_populates="model", order_by="VersionRow.number"
    )


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("model_id", "number", name="uq_versions_model_number"),
        UniqueConstraint("model_id", "digest", name="uq_versions_model_digest"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(71))
    snapshot_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"), nullable=True)
    diff_sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"), nullable=True)
    notes: Mapped[str] = mapped_column(Text, default="")
    method: Mapped[str] = mapped_column(String(64), default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    retired: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    model: Mapped[ModelRow] = relationship(back_populates="versions")
    snapshot: Mapped[BlobRow] = relationship(foreign_keys=[snapshot_sha256])
    diff: Mapped[BlobRow | None] = relationship(foreign_keys=[diff_sha256])


class ComposedDiffRow(Base):
    """A cached exact diff from one version straight to another (built on demand)."""

    __tablename__ = "composed_diffs"
    __table_args__ = (
        UniqueConstraint("from_version_id", "to_version_id", name="uq_composed_pair"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    from_version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    to_version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    blob: Mapped[BlobRow] = relationship()


class ApiTokenRow(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DeviceRow(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    credential_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tags: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    model_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    version_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    digest: Mapped[str | None] = mapped_column(String(71), nullable=True)
    last_outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    enrolled_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class ReportRow(Base):
    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    outcome: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_name: Mapped[str] = mapped_column(String(128))
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bytes_downloaded: Mapped[int] = mapped_column(BigInteger, default=0)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class TufMetadataRow(Base):
    """One signed TUF metadata file; every version is kept (devices fetch by version)."""

    __tablename__ = "tuf_metadata"
    __table_args__ = (UniqueConstraint("role", "version", name="uq_tuf_role_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    role: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ReleaseRow(Base):
    """A release: one target version for the devices a selector picks, rolled out in
    phases. See :mod:`server.rollout` for how devices are chosen."""

    __tablename__ = "releases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    name: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    """draft, active, paused, halted or completed."""
    selector: Mapped[dict[str, Any]] = mapped_column(JSON)
    """``{"tags": {key: [values]}, "devices": [ids]}``; empty selects every device."""
    percent: Mapped[float] = mapped_column(Float)
    """Share of the selected devices in the rollout (only ever raised)."""
    rate_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    window_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    window_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    rollback: Mapped[bool] = mapped_column(Boolean, default=False)
    """An explicit rollback to an older version (signed as such)."""
    failure_threshold: Mapped[float] = mapped_column(Float)
    min_attempts: Mapped[int] = mapped_column(Integer)
    max_wer_regression: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Quality gate: the most any cohort's WER may rise against the replaced version."""
    halt_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    canary_sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"), nullable=True)
    """The canary bundle devices decode before switching (:mod:`diffs.canary`), if any."""
    canary_max_wer: Mapped[float | None] = mapped_column(Float, nullable=True)
    """The bundle's WER bound (a copy of what the signed bundle holds)."""
    canary_clips: Mapped[int | None] = mapped_column(Integer, nullable=True)

    canary: Mapped[BlobRow | None] = relationship(foreign_keys=[canary_sha256])


class AssignmentRow(Base):
    """A device's progress in a release (written when it first gets the release's plan)."""

    __tablename__ = "release_assignments"
    __table_args__ = (UniqueConstraint("release_id", "device_id", name="uq_assignment_pair"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    release_id: Mapped[int] = mapped_column(
        ForeignKey("releases.id", ondelete="CASCADE"), index=True
    )
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    """pending (plan served), applied or failed."""
    reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    bytes_downloaded: Mapped[int] = mapped_column(BigInteger, default=0)
    assigned_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AuditRow(Base):
    """One operator action: who, what, when, from where. Never updated or deleted."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    remote: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
