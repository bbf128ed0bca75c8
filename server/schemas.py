"""Operator-facing API schemas (Create / Update / Public per resource)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from server.auth import Scope

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="lowercase letters, digits, . _ -")
    description: str = Field(default="", max_length=4000)


class ModelPublic(BaseModel):
    name: str
    description: str
    created_at: datetime
    versions: int
    latest: int | None


class VersionUpdate(Strict):
    notes: str | None = Field(default=None, max_length=20000)
    method: str | None = Field(default=None, max_length=64)
    metrics: dict[str, Any] | None = None
    retired: bool | None = None


class VersionPublic(BaseModel):
    model: str
    version: int
    digest: str
    parent: int | None
    snapshot_sha256: str
    snapshot_size: int
    diff_sha256: str | None
    diff_size: int | None
    notes: str
    method: str
    metrics: dict[str, Any]
    retired: bool
    created_at: datetime
    created: bool = Field(default=False, description="false when the same content existed")


class TokenCreate(Strict):
    name: str = Field(min_length=1, max_length=128)
    scopes: list[Scope] = Field(min_length=1)


class TokenPublic(BaseModel):
    id: int
    name: str
    scopes: list[Scope]
    revoked: bool
    created_at: datetime


class TokenCreated(TokenPublic):
    token: str = Field(description="shown once; store it now")


class DevicePublic(BaseModel):
    id: str
    tags: dict[str, str]
    model: str | None
    version: int | None
    digest: str | None
    last_outcome: str | None
    last_seen: datetime | None
    enrolled_at: datetime


class ProvisioningBundle(BaseModel):
    """What a device is flashed with: whom to trust and how to enroll."""

    trusted_root: dict[str, Any]
    enrollment_secret: str
    metadata_path: str = "/tuf/"


class SelectorSchema(Strict):
    tags: dict[str, list[str]] = Field(default_factory=dict, max_length=32)
    devices: list[str] = Field(default_factory=list, max_length=10000)


class ReleaseCreate(Strict):
    model: str
    version: int = Field(ge=0)
    name: str = Field(default="", max_length=128)
    selector: SelectorSchema = Field(default_factory=SelectorSchema)
    percent: float = Field(default=100.0, ge=0, le=100)
    rate_per_minute: int | None = Field(default=None, ge=1)
    window_start: datetime | None = None
    window_end: datetime | None = None
    rollback: bool = Field(default=False, description="an explicit, signed rollback")
    failure_threshold: float = Field(default=0.2, gt=0, le=1)
    min_attempts: int = Field(default=5, ge=1)
    max_wer_regression: float | None = Field(default=None, ge=0)
    activate: bool = False


class ReleaseExpand(Strict):
    percent: float = Field(ge=0, le=100)


class ReleaseAction(Strict):
    reason: str | None = Field(default=None, max_length=500)


class ReleaseProgress(BaseModel):
    started: int
    pending: int
    applied: int
    failed: int
    failures_by_reason: dict[str, int]
    bytes_downloaded: int
    bytes_full_equivalent: int


class CanaryPublic(BaseModel):
    """A release's canary bundle: devices decode its clips before switching models."""

    sha256: str
    size: int
    max_wer: float
    clips: int
    target_path: str


class ReleasePublic(BaseModel):
    id: int
    model: str
    version: int
    name: str
    state: str
    selector: SelectorSchema
    percent: float
    rate_per_minute: int | None
    window_start: datetime | None
    window_end: datetime | None
    rollback: bool
    failure_threshold: float
    min_attempts: int
    max_wer_regression: float | None
    halt_reason: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    progress: ReleaseProgress | None = None
    canary: CanaryPublic | None = None


class AuditPublic(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    remote: str | None
    detail: dict[str, Any]
