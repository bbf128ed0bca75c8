"""The wire schema shared by the server and the device agent (and nothing else).

These pydantic models are the JSON bodies of the device-facing API: enrollment, the
update plan, and reports. Both sides import them from here so they can never drift.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Digest = str
"""A canonical model digest, ``sha256:<64 hex>``."""


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnrollRequest(WireModel):
    enrollment_secret: str = Field(min_length=1, max_length=512)
    device_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    tags: dict[str, str] = Field(default_factory=dict, max_length=64)
    credential: str | None = Field(default=None, min_length=32, max_length=256)
    """A secret the device chose itself (the server keeps only its hash). With it,
    enrolling again after a lost answer is harmless: the same device id and credential
    are accepted again instead of refused."""


class EnrollResponse(WireModel):
    device_id: str
    credential: str
    """Sent as ``Authorization: Bearer <credential>`` on every later request."""


class VersionRef(WireModel):
    model: str
    version: int
    digest: Digest


class PlanStep(WireModel):
    kind: Literal["diff", "composed", "snapshot"]
    url: str
    """Where to download the blob (relative to the server, or absolute)."""
    target_path: str
    """The TUF target path that signs this blob's length and hashes."""
    sha256: str
    size: int
    source_digest: Digest | None
    """The model this step applies to (``None`` for a full snapshot)."""
    target_digest: Digest


class PlanOption(WireModel):
    kind: Literal["chain", "composed", "full"]
    total_bytes: int
    steps: list[PlanStep]


class CanaryRef(WireModel):
    """The release's canary bundle (:mod:`diffs.canary`): the device decodes its clips with
    the staged model and refuses the model if the WER is above the bound."""

    url: str
    target_path: str
    """The TUF target path that signs the bundle's length and hashes (and the model
    digest it is for)."""
    sha256: str
    size: int
    max_wer: float
    """The bound the bundle holds (the device enforces the one in the signed bytes)."""
    clips: int


class UpdatePlan(WireModel):
    status: Literal["update", "current"]
    target: VersionRef | None = None
    current: VersionRef | None = None
    options: list[PlanOption] = Field(default_factory=list)
    """Cheapest first; each later option is the fallback of the one before."""
    rollback: bool = False
    """True when the target is older than the device's version by an explicit release."""
    release_id: int | None = None
    """The release this plan belongs to (``None``: no release governs the device)."""
    canary: CanaryRef | None = None
    """The release's canary check, sent only to agents that ask for it (``canary=true``)
    and left out of the JSON when there is none, so older agents, whose schema forbids
    unknown fields, read every plan they are sent."""


Outcome = Literal["updated", "failed", "rolled_back", "current"]


class StepReport(WireModel):
    kind: str
    sha256: str
    bytes_downloaded: int = 0
    seconds: float = 0.0


class UpdateReport(WireModel):
    model: str
    outcome: Outcome
    reason: str | None = Field(default=None, max_length=64)
    """A reason code for failures (``digest_mismatch``, ``download_failed``, ...)."""
    message: str | None = Field(default=None, max_length=2000)
    from_version: int | None = None
    from_digest: Digest | None = None
    to_version: int | None = None
    to_digest: Digest | None = None
    plan_kind: str | None = None
    bytes_downloaded: int = 0
    seconds: float = 0.0
    steps: list[StepReport] = Field(default_factory=list, max_length=256)
    release_id: int | None = None
    """The release of the plan this report is about."""
