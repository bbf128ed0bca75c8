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
