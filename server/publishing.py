"""Publishing models: a base snapshot, or a diff against a named parent version.

A publish is atomic and idempotent:

1. the upload is validated completely (a model: safetensors + canonical digest; a diff:
   container, manifest, base digest = parent's digest, and applied to the parent to
   *materialize* the child, whose digest must equal the diff's declared target);
2. content already published (same canonical digest for the model) returns the
   existing version -- the same content twice is never two versions;
3. blobs are stored (content-addressed), their targets signed, and only then the rows
   committed in one transaction; if anything fails, blobs this publish created are
   removed again and no row exists.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from diffs.container import DiffReader
from diffs.digest import file_digest
from diffs.errors import BaseMismatchError, DiffError, TargetMismatchError
from diffs.patch_file import apply_to_file
from server.context import ServiceContext, diff_path, snapshot_path
from server.db import transaction
from server.errors import ConflictError, InvalidUploadError, NotFoundError
from server.models import BlobRow, ModelRow, VersionRow
from server.trust.repository import TargetSpec
from server.uploads import Upload, file_sha256


@dataclass(frozen=True)
class VersionMeta:
    notes: str = ""
    method: str = ""
    metrics: dict[str, Any] | None = None


@dataclass(frozen=True)
class Published:
    version: VersionRow
    created: bool


def _model(session: Session, name: str) -> ModelRow:
    model = session.scalar(select(ModelRow).where(ModelRow.name == name))
    if model is None:
        raise NotFoundError(f"no model named {name!r}")
    return model


def _existing(session: Session, model_id: int, digest: str) -> VersionRow | None:
    return session.scalar(
        select(VersionRow).where(VersionRow.model_id == model_id, VersionRow.digest == digest)
    )


def publish_base(
    ctx: ServiceContext, model_name: str, upload: Upload, meta: VersionMeta
) -> Published:
    with ctx.sessions() as session:
        model = _model(session, model_name)
    try:
        digest = file_digest(upload.path, ctx.limits)
    except DiffError as exc:
        raise InvalidUploadError(f"not a valid safetensors model: {exc}") from None
    with ctx.sessions() as session:
        existing = _existing(session, model.id, digest)
        if existing is not None:
            return Published(existing, created=False)
    blobs = [(upload.path, upload.sha256, upload.size, "snapshot")]
    targets = [_target(snapshot_path(model_name, upload.sha256), upload, "snapshot", digest)]
    return _commit(ctx, model, digest, None, blobs, targets, upload.sha256, None, meta)


def publish_diff(
    ctx: ServiceContext, model_name: str, parent_number: int, upload: Upload, meta: VersionMeta
) -> Published:
    with ctx.sessions() as session:
        model = _model(session, model_name)
        parent = session.scalar(
            select(VersionRow).where(
                VersionRow.model_id == model.id, VersionRow.number == parent_number
            )
        )
        if parent is None:
            raise NotFoundError(f"model {model_name!r} has no version {parent_number}")
    try:
        reader = DiffReader(upload.path, ctx.limits)
    except DiffError as exc:
        raise InvalidUploadError(f"not a valid diff: {exc}") from None
    with reader, _scratch(ctx) as scratch:
        if reader.base_digest != parent.digest:
            raise InvalidUploadError(
                f"the diff applies to {reader.base_digest}, but version {parent_number} "
                f"of {model_name!r} is {parent.digest}"
            )
        with ctx.sessions() as session:
            existing = _existing(session, model.id, reader.target_digest)
            if existing is not None:
                return Published(existing, created=False)
        base_file = ctx.blobs.local_path(parent.snapshot_sha256)
        if base_file is None:
            base_file = scratch / "parent.safetensors"
            ctx.blobs.fetch_to(parent.snapshot_sha256, base_file)
        child = scratch / "child.safetensors"
        try:
            digest = apply_to_file(
                base_file, [reader], child, base_digest=parent.digest, limits=ctx.limits
            )
        except TargetMismatchError as exc:
            raise InvalidUploadError(
                f"the diff declares target {exc.expected}, but applying it to version "
                f"{parent_number} gives {exc.actual}"
            ) from None
        except BaseMismatchError as exc:  # pragma: no cover - checked above
            raise InvalidUploadError(str(exc)) from None
        except DiffError as exc:
            raise InvalidUploadError(
                f"the diff does not apply to version {parent_number}: {exc}"
            ) from None
        child_sha = file_sha256(child)
        child_size = child.stat().st_size
        blobs = [
            (upload.path, upload.sha256, upload.size, "diff"),
            (child, child_sha, child_size, "snapshot"),
        ]
        targets = [
            _target(diff_path(model_name, upload.sha256), upload, "diff", digest, parent.digest),
            TargetSpec(
                snapshot_path(model_name, child_sha),
                child_size,
                child_sha,
                {"kind": "snapshot", "digest": digest},
            ),
        ]
        return _commit(ctx, model, digest, parent, blobs, targets, child_sha, upload.sha256, meta)


def _target(
    path: str, upload: Upload, kind: str, digest: str, source: str | None = None
) -> TargetSpec:
    custom: dict[str, Any] = {"kind": kind, "digest": digest}
    if source is not None:
        custom["source_digest"] = source
    return TargetSpec(path, upload.size, upload.sha256, custom)


@contextlib.contextmanager
def _scratch(ctx: ServiceContext) -> Iterator[Path]:
    ctx.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.tmp_dir, prefix="publish-") as tmp:
        yield Path(tmp)


def _commit(
    ctx: ServiceContext,
    model: ModelRow,
    digest: str,
    parent: VersionRow | None,
    blobs: list[tuple[Path, str, int, str]],
    targets: list[TargetSpec],
    snapshot_sha: str,
    diff_sha: str | None,
    meta: VersionMeta,
) -> Published:
    with ctx.sessions() as session:
        highest = session.scalar(
            select(func.max(VersionRow.number)).where(VersionRow.model_id == model.id)
        )
    number = 0 if highest is None else highest + 1
    signed = [
        TargetSpec(t.path, t.length, t.sha256, {**t.custom, "version": number}) for t in targets
    ]
    created_blobs = [sha for _, sha, _, _ in blobs if not ctx.blobs.exists(sha)]
    try:
        for path, sha, size, _ in blobs:
            ctx.blobs.put_file(path, sha, size)
        ctx.trust.add_targets(model.name, signed)
        try:
            with transaction(ctx.sessions) as session:
                for _, sha, size, kind in blobs:
                    if session.get(BlobRow, sha) is None:
                        session.add(BlobRow(sha256=sha, size=size, kind=kind))
                row = VersionRow(
                    model_id=model.id,
                    number=number,
                    digest=digest,
                    snapshot_sha256=snapshot_sha,
                    parent_id=parent.id if parent else None,
                    diff_sha256=diff_sha,
                    notes=meta.notes,
                    method=meta.method,
                    metrics=meta.metrics or {},
                    retired=False,
                )
                session.add(row)
        except IntegrityError:
            with ctx.sessions() as session:
                existing = _existing(session, model.id, digest)
            if existing is not None:
                return Published(existing, created=False)
            raise ConflictError(
                "another publish to this model happened at the same time; retry"
            ) from None
    except BaseException:
        with ctx.sessions() as session:
            for sha in created_blobs:
                if session.get(BlobRow, sha) is None:
                    ctx.blobs.delete(sha)
        raise
    ctx.catalog.invalidate(model.name)
    return Published(row, created=True)
