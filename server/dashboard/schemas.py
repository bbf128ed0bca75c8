"""Response bodies of the dashboard's read-only JSON endpoints."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from server.auth import Scope


class WhoAmI(BaseModel):
    name: str
    scopes: list[Scope] = Field(description="the scopes the token was granted")
    effective_scopes: list[Scope] = Field(description="those scopes and the ones they imply")


class VersionCount(BaseModel):
    version: int | None = Field(description="null: the device has not reported a version")
    devices: int


class ModelFleet(BaseModel):
    model: str
    latest: int | None = Field(description="the newest published version")
    devices: int
    versions: list[VersionCount] = Field(description="newest first; unknown last")


class FleetSummary(BaseModel):
    devices: int
    unreported: int = Field(description="devices that have not yet reported any model")
    models: list[ModelFleet]
    last_outcomes: dict[str, int] = Field(description="devices by the outcome they last reported")
    bytes_downloaded: int = Field(description="bytes devices downloaded for applied updates")
    bytes_full_equivalent: int = Field(
        description="what the same updates would have cost as full snapshots"
    )


class TimelineBucket(BaseModel):
    start: datetime
    outcomes: dict[str, int]
    reasons: dict[str, int] = Field(description="failed and rolled-back reports by reason")
    bytes_downloaded: int = Field(description="for applied updates")
    bytes_full_equivalent: int


class Timeline(BaseModel):
    start: datetime
    end: datetime
    bucket_seconds: int
    buckets: list[TimelineBucket]
