"""Devices: enrollment, polling for an update plan, reports; and the operator's list."""

from __future__ import annotations

import hmac
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from diffs.wire import EnrollRequest, EnrollResponse, UpdatePlan, UpdateReport
from server.api.deps import Context, Device, Reader
from server.auth import new_secret, secret_hash
from server.db import transaction
from server.errors import AuthenticationError, ConflictError, NotFoundError
from server.models import DeviceRow, ReportRow
from server.schemas import DevicePublic
from server.updates import plan_etag, plan_update

router = APIRouter(prefix="/v1/devices", tags=["devices"])


@router.post("/enroll", status_code=status.HTTP_201_CREATED)
def enroll(body: EnrollRequest, ctx: Context) -> EnrollResponse:
    expected = ctx.settings.enrollment_secret
    if not expected or not hmac.compare_digest(body.enrollment_secret.encode(), expected.encode()):
        raise AuthenticationError("wrong enrollment secret")
    device_id = body.device_id or uuid.uuid4().hex
    credential = new_secret("dev")
    try:
        with transaction(ctx.sessions) as session:
            session.add(
                DeviceRow(id=device_id, credential_hash=secret_hash(credential), tags=body.tags)
            )
    except IntegrityError:
        raise ConflictError(f"device {device_id!r} is already enrolled") from None
    return EnrollResponse(device_id=device_id, credential=credential)


@router.get(
    "/{device_id}/update",
    response_model=UpdatePlan,
    responses={304: {"description": "the plan has not changed since the ETag sent"}},
)
def poll(
    device_id: str,
    request: Request,
    response: Response,
    ctx: Context,
    _device: Device,
    model: Annotated[str, Query(max_length=128)],
    digest: Annotated[str | None, Query(pattern=r"^sha256:[0-9a-f]{64}$")] = None,
) -> Any:
    """The device's update plan for ``model``, given the digest it runs."""
    plan = plan_update(ctx, model, digest)
    target = plan.target.digest if plan.target else (plan.current.digest if plan.current else "")
    etag = plan_etag(target, digest)
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    response.headers["ETag"] = etag
    response.headers["Cache-Control"] = "private, no-cache"
    return plan


@router.post("/{device_id}/reports", status_code=status.HTTP_202_ACCEPTED)
async def report(
    device_id: str, body: UpdateReport, ctx: Context, _device: Device
) -> dict[str, str]:
    def store() -> None:
        with transaction(ctx.sessions) as session:
            session.add(
                ReportRow(
                    device_id=device_id,
                    outcome=body.outcome,
                    reason=body.reason,
                    model_name=body.model,
                    from_version=body.from_version,
                    to_version=body.to_version,
                    bytes_downloaded=body.bytes_downloaded,
                    detail=body.model_dump(mode="json"),
                )
            )
            row = session.get(DeviceRow, device_id)
            assert row is not None
            row.last_outcome = body.outcome
            row.last_seen = datetime.now(UTC)
            row.model_name = body.model
            if body.outcome in ("updated", "current", "rolled_back") and body.to_digest:
                row.version_number = body.to_version
                row.digest = body.to_digest
            elif body.from_digest:
                row.version_number = body.from_version
                row.digest = body.from_digest

    await run_in_threadpool(store)
    return {"status": "accepted"}


def _device_public(row: DeviceRow) -> DevicePublic:
    return DevicePublic(
        id=row.id,
        tags=row.tags,
        model=row.model_name,
        version=row.version_number,
        digest=row.digest,
        last_outcome=row.last_outcome,
        last_seen=row.last_seen,
        enrolled_at=row.enrolled_at,
    )


@router.get("")
def list_devices(
    ctx: Context,
    _: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[DevicePublic]:
    with ctx.sessions() as session:
        rows = session.scalars(select(DeviceRow).order_by(DeviceRow.id).limit(limit).offset(offset))
        return [_device_public(r) for r in rows]


@router.get("/{device_id}")
def get_device(device_id: str, ctx: Context, _: Reader) -> DevicePublic:
    with ctx.sessions() as session:
        row = session.get(DeviceRow, device_id)
        if row is None:
            raise NotFoundError(f"no device {device_id!r}")
        return _device_public(row)
