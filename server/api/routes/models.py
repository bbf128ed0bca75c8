"""Models and their versions: create, publish (base or diff), list, inspect, annotate, retire."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from server.api.deps import Context, Publisher, Reader
from server.audit import record
from server.db import transaction
from server.errors import ConflictError, NotFoundError
from server.models import BlobRow, ModelRow, VersionRow
from server.publishing import VersionMeta, publish_base, publish_diff
from server.schemas import ModelCreate, ModelPublic, VersionPublic, VersionUpdate
from server.uploads import receive

router = APIRouter(prefix="/v1/models", tags=["models"])


def _model_public(session_model: ModelRow, count: int, latest: int | None) -> ModelPublic:
    return ModelPublic(
        name=session_model.name,
        description=session_model.description,
        created_at=session_model.created_at,
        versions=count,
        latest=latest,
    )


@router.post("", status_code=status.HTTP_201_CREATED)
def create_model(
    body: ModelCreate, request: Request, ctx: Context, operator: Publisher
) -> ModelPublic:
    try:
        with transaction(ctx.sessions) as session:
            row = ModelRow(name=body.name, description=body.description)
            session.add(row)
            session.flush()
            record(session, operator, "model.create", f"model/{body.name}", request)
            session.refresh(row)
    except IntegrityError:
        raise ConflictError(f"a model named {body.name!r} exists") from None
    return _model_public(row, 0, None)


@router.get("")
def list_models(ctx: Context, _: Reader) -> list[ModelPublic]:
    with ctx.sessions() as session:
        rows = session.execute(
            select(ModelRow, func.count(VersionRow.id), func.max(VersionRow.number))
            .outerjoin(VersionRow, VersionRow.model_id == ModelRow.id)
            .group_by(ModelRow.id)
            .order_by(ModelRow.name)
        ).all()
    return [_model_public(m, count, latest) for m, count, latest in rows]


def _version_public(
    row: VersionRow, model: str, sizes: dict[str, int], created: bool = False
) -> VersionPublic:
    parent = row.parent_id
    return VersionPublic(
        model=model,
        version=row.number,
        digest=row.digest,
        parent=parent,
        snapshot_sha256=row.snapshot_sha256,
        snapshot_size=sizes[row.snapshot_sha256],
        diff_sha256=row.diff_sha256,
        diff_size=sizes.get(row.diff_sha256) if row.diff_sha256 else None,
        notes=row.notes,
        method=row.method,
        metrics=row.metrics,
        retired=row.retired,
        created_at=row.created_at,
        created=created,
    )


def _versions(ctx: Context, model: str, number: int | None = None) -> list[VersionPublic]:
    with ctx.sessions() as session:
        model_row = session.scalar(select(ModelRow).where(ModelRow.name == model))
        if model_row is None:
            raise NotFoundError(f"no model named {model!r}")
        query = (
            select(VersionRow)
            .where(VersionRow.model_id == model_row.id)
            .order_by(VersionRow.number)
        )
        if number is not None:
            query = query.where(VersionRow.number == number)
        rows = list(session.scalars(query))
        if number is not None and not rows:
            raise NotFoundError(f"model {model!r} has no version {number}")
        numbers = {
            r.id: r.number
            for r in session.scalars(select(VersionRow).where(VersionRow.model_id == model_row.id))
        }
        shas = {r.snapshot_sha256 for r in rows} | {r.diff_sha256 for r in rows if r.diff_sha256}
        query_sizes = select(BlobRow.sha256, BlobRow.size).where(BlobRow.sha256.in_(shas))
        sizes = {sha: size for sha, size in session.execute(query_sizes)}
    result = []
    for row in rows:
        public = _version_public(row, model, sizes)
        result.append(
            public.model_copy(
                update={"parent": numbers.get(row.parent_id) if row.parent_id else None}
            )
        )
    return result


@router.get("/{model}/versions")
def list_versions(model: str, ctx: Context, _: Reader) -> list[VersionPublic]:
    return _versions(ctx, model)


@router.get("/{model}/versions/{number}")
def get_version(model: str, number: int, ctx: Context, _: Reader) -> VersionPublic:
    return _versions(ctx, model, number)[0]


@router.post(
    "/{model}/versions",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"description": "the same content was already published"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def publish_version(
    model: str,
    request: Request,
    response: Response,
    ctx: Context,
    operator: Publisher,
    parent: Annotated[
        int | None, Query(ge=0, description="parent version: the body is a diff")
    ] = None,
    notes: Annotated[str, Query(max_length=20000)] = "",
    method: Annotated[str, Query(max_length=64)] = "",
) -> VersionPublic:
    """Publish a version: the body is a safetensors model, or (with ``parent``) a diff."""
    upload = await receive(
        request.stream(),
        ctx.tmp_dir,
        ctx.settings.max_upload_bytes,
        request.headers.get("content-length"),
    )
    meta = VersionMeta(notes=notes, method=method)
    try:
        if parent is None:
            published = await run_in_threadpool(publish_base, ctx, model, upload, meta)
        else:
            published = await run_in_threadpool(publish_diff, ctx, model, parent, upload, meta)
    finally:
        upload.discard()
    if not published.created:
        response.status_code = status.HTTP_200_OK
    number = published.version.number
    with transaction(ctx.sessions) as session:
        record(
            session,
            operator,
            "version.publish",
            f"model/{model}/version/{number}",
            request,
            parent=parent,
            sha256=upload.sha256,
            created=published.created,
        )
    public = _versions(ctx, model, number)[0]
    return public.model_copy(update={"created": published.created})


@router.patch("/{model}/versions/{number}")
def update_version(
    model: str,
    number: int,
    body: VersionUpdate,
    request: Request,
    ctx: Context,
    operator: Publisher,
) -> VersionPublic:
    with transaction(ctx.sessions) as session:
        row = session.scalar(
            select(VersionRow)
            .join(ModelRow)
            .where(ModelRow.name == model, VersionRow.number == number)
        )
        if row is None:
            raise NotFoundError(f"model {model!r} has no version {number}")
        changes = body.model_dump(exclude_none=True)
        for field, value in changes.items():
            setattr(row, field, value)
        record(
            session,
            operator,
            "version.update",
            f"model/{model}/version/{number}",
            request,
            **changes,
        )
    ctx.catalog.invalidate(model)
    return _versions(ctx, model, number)[0]
