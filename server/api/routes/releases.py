"""Releases: create, list, show (with progress), activate, pause, resume, halt,
complete, expand; attach or remove a canary bundle; and the read-only audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server import canaries, releases
from server.api.deps import Context, Publisher, Reader
from server.audit import record
from server.context import ServiceContext, canary_path
from server.db import transaction
from server.errors import NotFoundError
from server.models import AssignmentRow, AuditRow, BlobRow, ModelRow, ReleaseRow, VersionRow
from server.releases import ReleaseSpec
from server.schemas import (
    AuditPublic,
    CanaryPublic,
    ReleaseAction,
    ReleaseCreate,
    ReleaseExpand,
    ReleaseProgress,
    ReleasePublic,
    SelectorSchema,
)
from server.uploads import receive

router = APIRouter(tags=["releases"])


def _public(session: Session, row: ReleaseRow, with_progress: bool = False) -> ReleasePublic:
    model = session.get(ModelRow, row.model_id)
    version = session.get(VersionRow, row.version_id)
    assert model is not None and version is not None
    progress = None
    if with_progress:
        counts = releases.status_counts(session, row.id)
        downloaded = session.scalar(
            select(func.coalesce(func.sum(AssignmentRow.bytes_downloaded), 0)).where(
                AssignmentRow.release_id == row.id
            )
        )
        snapshot = session.get(BlobRow, version.snapshot_sha256)
        finished = counts.get("applied", 0) + counts.get("failed", 0)
        progress = ReleaseProgress(
            started=sum(counts.values()),
            pending=counts.get("pending", 0),
            applied=counts.get("applied", 0),
            failed=counts.get("failed", 0),
            failures_by_reason=releases.reason_counts(session, row.id),
            bytes_downloaded=int(downloaded or 0),
            bytes_full_equivalent=finished * (snapshot.size if snapshot else 0),
        )
    canary = None
    if row.canary is not None and row.canary_max_wer is not None and row.canary_clips is not None:
        canary = CanaryPublic(
            sha256=row.canary.sha256,
            size=row.canary.size,
            max_wer=row.canary_max_wer,
            clips=row.canary_clips,
            target_path=canary_path(model.name, row.id, row.canary.sha256),
        )
    return ReleasePublic(
        id=row.id,
        model=model.name,
        version=version.number,
        name=row.name,
        state=row.state,
        selector=SelectorSchema.model_validate(row.selector),
        percent=row.percent,
        rate_per_minute=row.rate_per_minute,
        window_start=row.window_start,
        window_end=row.window_end,
        rollback=row.rollback,
        failure_threshold=row.failure_threshold,
        min_attempts=row.min_attempts,
        max_wer_regression=row.max_wer_regression,
        halt_reason=row.halt_reason,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
        progress=progress,
        canary=canary,
    )


@router.post("/v1/releases", status_code=status.HTTP_201_CREATED)
def create_release(
    body: ReleaseCreate, request: Request, ctx: Context, operator: Publisher
) -> ReleasePublic:
    spec = ReleaseSpec(
        model=body.model,
        version=body.version,
        name=body.name or f"{body.model} v{body.version}",
        selector=body.selector.model_dump(),
        percent=body.percent,
        rate_per_minute=body.rate_per_minute,
        window_start=body.window_start,
        window_end=body.window_end,
        rollback=body.rollback,
        failure_threshold=body.failure_threshold,
        min_attempts=body.min_attempts,
        max_wer_regression=body.max_wer_regression,
    )
    with transaction(ctx.sessions) as session:
        row = releases.create(session, spec, operator.name)
        if body.activate:
            releases.transition(session, row, "activate")
        record(
            session,
            operator,
            "release.create",
            f"release/{row.id}",
            request,
            model=body.model,
            version=body.version,
            activate=body.activate,
            rollback=body.rollback,
        )
        session.flush()
        public = _public(session, row)
    ctx.catalog.invalidate(body.model)
    return public


@router.get("/v1/releases")
def list_releases(
    ctx: Context,
    _: Reader,
    model: Annotated[str | None, Query()] = None,
    state: Annotated[str | None, Query()] = None,
) -> list[ReleasePublic]:
    with ctx.sessions() as session:
        query = select(ReleaseRow).order_by(ReleaseRow.id.desc())
        if model:
            query = query.join(ModelRow, ModelRow.id == ReleaseRow.model_id).where(
                ModelRow.name == model
            )
        if state:
            query = query.where(ReleaseRow.state == state)
        return [_public(session, row, with_progress=True) for row in session.scalars(query)]


@router.get("/v1/releases/{release_id}")
def show_release(release_id: int, ctx: Context, _: Reader) -> ReleasePublic:
    with ctx.sessions() as session:
        return _public(session, releases.get(session, release_id), with_progress=True)


def _act(
    release_id: int,
    action: str,
    reason: str | None,
    request: Request,
    ctx: Context,
    operator: Publisher,
) -> ReleasePublic:
    with transaction(ctx.sessions) as session:
        row = releases.get(session, release_id)
        releases.transition(session, row, action, reason)
        record(session, operator, f"release.{action}", f"release/{row.id}", request, reason=reason)
        session.flush()
        public = _public(session, row, with_progress=True)
    ctx.catalog.invalidate(public.model)
    return public


@router.post("/v1/releases/{release_id}/expand")
def expand_release(
    release_id: int, body: ReleaseExpand, request: Request, ctx: Context, operator: Publisher
) -> ReleasePublic:
    with transaction(ctx.sessions) as session:
        row = releases.get(session, release_id)
        before = row.percent
        releases.expand(row, body.percent)
        record(
            session,
            operator,
            "release.expand",
            f"release/{row.id}",
            request,
            before=before,
            after=body.percent,
        )
        session.flush()
        public = _public(session, row, with_progress=True)
    ctx.catalog.invalidate(public.model)
    return public


@router.put(
    "/v1/releases/{release_id}/canary",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def attach_canary(
    release_id: int, request: Request, ctx: Context, operator: Publisher
) -> ReleasePublic:
    """Attach a canary bundle (the body, :mod:`diffs.canary`) to the release, replacing
    any other; it is validated completely before anything is stored."""
    upload = await receive(
        request.stream(),
        ctx.tmp_dir,
        min(ctx.settings.max_upload_bytes, canaries.MAX_BUNDLE_BYTES),
        request.headers.get("content-length"),
    )

    def audit(session: Session, row: ReleaseRow) -> None:
        record(
            session,
            operator,
            "release.canary",
            f"release/{row.id}",
            request,
            sha256=row.canary_sha256,
            max_wer=row.canary_max_wer,
            clips=row.canary_clips,
        )

    try:
        await run_in_threadpool(canaries.attach, ctx, release_id, upload, audit)
    finally:
        upload.discard()
    return await run_in_threadpool(_shown, ctx, release_id)


@router.delete("/v1/releases/{release_id}/canary")
def detach_canary(
    release_id: int, request: Request, ctx: Context, operator: Publisher
) -> ReleasePublic:
    """Take the canary off the release (devices switch without one from their next plan)."""

    def audit(session: Session, row: ReleaseRow) -> None:
        record(session, operator, "release.canary.remove", f"release/{row.id}", request)

    canaries.detach(ctx, release_id, audit)
    return _shown(ctx, release_id)


def _shown(ctx: ServiceContext, release_id: int) -> ReleasePublic:
    with ctx.sessions() as session:
        return _public(session, releases.get(session, release_id), with_progress=True)


@router.post("/v1/releases/{release_id}/{action}")
def act_on_release(
    release_id: int,
    action: str,
    request: Request,
    ctx: Context,
    operator: Publisher,
    body: ReleaseAction | None = None,
) -> ReleasePublic:
    """``activate`` (runs the quality gate), ``pause``, ``resume``, ``halt``, ``complete``."""
    if action not in releases.TRANSITIONS:
        raise NotFoundError(f"unknown release action {action!r}")
    return _act(release_id, action, body.reason if body else None, request, ctx, operator)


@router.get("/v1/audit")
def audit_log(
    ctx: Context,
    _: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_id: Annotated[int | None, Query(ge=1)] = None,
) -> list[AuditPublic]:
    with ctx.sessions() as session:
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if before_id is not None:
            query = query.where(AuditRow.id < before_id)
        return [
            AuditPublic(
                id=r.id,
                at=r.at,
                actor=r.actor,
                action=r.action,
                target=r.target,
                remote=r.remote,
                detail=r.detail,
            )
            for r in session.scalars(query)
        ]
