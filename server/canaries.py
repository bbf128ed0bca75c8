"""Attaching a canary bundle to a release: validated completely, stored, signed, recorded.

Like a publish (:mod:`server.publishing`):

1. the release must exist and not be halted, and the upload must read as a bundle
   (:func:`diffs.canary.read_canary`, under its caps) -- before anything is stored;
2. the bundle is stored as a content-addressed blob, and signed as a target of the
   model's delegated role at ``<model>/canary<release>-<sha256>.safetensors``, with the
   digest and version of the model it checks in its custom fields;
3. only then the release row names it (and the audit entry commits with it); if
   anything fails, a blob this call stored is removed again.

Devices that run canary checks find it in their plans (:mod:`server.updates`). The
bound is the one inside the bundle: the signed bytes are what a device enforces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from diffs.canary import DEFAULT_LIMITS, read_canary
from diffs.errors import CanaryFormatError
from server import releases
from server.context import ServiceContext, canary_path
from server.db import transaction
from server.errors import ConflictError, InvalidUploadError
from server.models import BlobRow, ModelRow, ReleaseRow, VersionRow
from server.trust.repository import TargetSpec
from server.uploads import Upload

MAX_BUNDLE_BYTES = DEFAULT_LIMITS.max_file_bytes

Audit = Callable[[Session, ReleaseRow], None]
"""Adds the audit entry, in the transaction that changes the release."""


@dataclass(frozen=True)
class Attached:
    release_id: int
    model: str
    sha256: str
    max_wer: float
    clips: int


def attach(ctx: ServiceContext, release_id: int, upload: Upload, audit: Audit) -> Attached:
    """Make ``upload`` the canary bundle of release ``release_id``."""
    with ctx.sessions() as session:
        release = releases.get(session, release_id)
        _check_state(release)
        model = session.get(ModelRow, release.model_id)
        version = session.get(VersionRow, release.version_id)
        assert model is not None and version is not None
    try:
        bundle = read_canary(upload.path)
    except CanaryFormatError as exc:
        raise InvalidUploadError(f"not a valid canary bundle: {exc}") from None
    target = TargetSpec(
        canary_path(model.name, release.id, upload.sha256),
        upload.size,
        upload.sha256,
        {
            "kind": "canary",
            "digest": version.digest,
            "version": version.number,
            "release": release.id,
        },
    )
    created = not ctx.blobs.exists(upload.sha256)
    try:
        ctx.blobs.put_file(upload.path, upload.sha256, upload.size)
        ctx.trust.add_targets(model.name, [target])
        with transaction(ctx.sessions) as session:
            if session.get(BlobRow, upload.sha256) is None:
                session.add(BlobRow(sha256=upload.sha256, size=upload.size, kind="canary"))
            row = releases.get(session, release_id)
            _check_state(row)
            row.canary_sha256 = upload.sha256
            row.canary_max_wer = bundle.max_wer
            row.canary_clips = len(bundle.clips)
            row.updated_at = datetime.now(UTC)
            session.flush()
            audit(session, row)
    except BaseException:
        if created:
            with ctx.sessions() as session:
                if session.get(BlobRow, upload.sha256) is None:
                    ctx.blobs.delete(upload.sha256)
        raise
    ctx.catalog.invalidate(model.name)
    return Attached(release.id, model.name, upload.sha256, bundle.max_wer, len(bundle.clips))


def detach(ctx: ServiceContext, release_id: int, audit: Audit) -> None:
    """Take the canary off a release: its devices switch without one from their next plan.
    (The bundle stays stored and signed: a device may be checking it right now.)"""
    with transaction(ctx.sessions) as session:
        row = releases.get(session, release_id)
        row.canary_sha256 = row.canary_max_wer = row.canary_clips = None
        row.updated_at = datetime.now(UTC)
        session.flush()
        audit(session, row)
        model = session.get(ModelRow, row.model_id)
        assert model is not None
    ctx.catalog.invalidate(model.name)


def _check_state(release: ReleaseRow) -> None:
    if release.state == "halted":
        raise ConflictError(f"release {release.id} is halted")
