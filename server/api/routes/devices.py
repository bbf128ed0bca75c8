"""Devices: enrollment, polling for an update plan, reports; and the operator's list."""

from __future__ import annotations

import hmac
import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from diffs.wire import EnrollRequest, EnrollResponse, UpdatePlan, UpdateReport
from server.api.deps import Context, Device, Reader, get_context
from server.auth import new_secret, secret_hash
from server.catalog import AnswerKey, ModelView, PlanAnswer
from server.context import ServiceContext
from server.db import transaction
from server.errors import AuthenticationError, ConflictError, NotFoundError
from server.metrics import observe_plan, observe_poll, observe_report
from server.models import DeviceRow, ReportRow
from server.planning import VersionNode
from server.releases import record_outcome, start_release
from server.schemas import DevicePublic
from server.targeting import GoverningRelease, decide
from server.updates import plan_etag, plan_update

router = APIRouter(prefix="/v1/devices", tags=["devices"])


@router.post("/enroll", status_code=status.HTTP_201_CREATED)
def enroll(body: EnrollRequest, ctx: Context) -> EnrollResponse:
    expected = ctx.settings.enrollment_secret
    if not expected or not hmac.compare_digest(body.enrollment_secret.encode(), expected.encode()):
        raise AuthenticationError("wrong enrollment secret")
    device_id = body.device_id or uuid.uuid4().hex
    credential = body.credential or new_secret("dev")
    try:
        with transaction(ctx.sessions) as session:
            session.add(
                DeviceRow(id=device_id, credential_hash=secret_hash(credential), tags=body.tags)
            )
    except IntegrityError:
        if body.credential is not None:
            with ctx.sessions() as session:
                known = session.get(DeviceRow, device_id)
            if known is not None and hmac.compare_digest(
                known.credential_hash, secret_hash(credential)
            ):
                return EnrollResponse(device_id=device_id, credential=credential)  # a retry
        raise ConflictError(f"device {device_id!r} is already enrolled") from None
    return EnrollResponse(device_id=device_id, credential=credential)


@router.get(
    "/{device_id}/update",
    response_model=UpdatePlan,
    responses={304: {"description": "the plan has not changed since the ETag sent"}},
)
async def poll(
    device_id: str,
    request: Request,
    device: Device,
    model: Annotated[str, Query(max_length=128)],
    digest: Annotated[str | None, Query(pattern=r"^sha256:[0-9a-f]{64}$")] = None,
    canary: Annotated[
        bool, Query(description="the agent runs canary checks: name the release's canary")
    ] = False,
) -> Response:
    """The device's update plan for ``model``, given the digest it runs.

    This is the hot path of a fleet: it runs on the event loop, and a device at a known
    version is answered from the worker's catalog view, whose answers (ETag and JSON
    bytes) are computed once per view and per (target, release). Which version a device
    is offered follows the release rules (:mod:`server.targeting`). Starting a release
    (rate limit, window, progress record) and building a new answer (which may build a
    composed diff) happen in a thread. Only an agent that says it runs canary checks
    (``canary=true``) is sent the release's canary; older agents get the plan without it.
    """
    ctx = get_context(request)
    view = ctx.catalog.cached(model)
    if view is None:
        view = await run_in_threadpool(ctx.catalog.model, model)
        if view is None:
            raise NotFoundError(f"no model named {model!r}")
    current = view.by_digest.get(digest) if digest else None
    decision = decide(
        view.versions, view.latest, view.releases, device.device_id, device.tags, current
    )
    target, governing = decision.target, decision.release
    headers = {"Cache-Control": "private, no-cache"}
    if target is not None and target.digest != digest and governing is not None:
        started = await run_in_threadpool(start_release, ctx.sessions, governing, device.device_id)
        if not started:
            target = None  # held back by the rate limit or the window: ask again later
            headers["Retry-After"] = "60"
    release_id = governing.release.id if governing is not None and target is not None else None
    key = (digest, target.id if target is not None else None, release_id, canary)
    answer = view.answers.get(key)
    if answer is None:
        answer = await run_in_threadpool(_plan_answer, ctx, view, digest, target, governing, key)
    observe_poll(
        "not_modified" if request.headers.get("if-none-match") == answer.etag else answer.status
    )
    if request.headers.get("if-none-match") == answer.etag:
        return Response(
            status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": answer.etag, **headers}
        )
    if answer.cheapest is not None:
        observe_plan(answer.cheapest)
    return Response(
        answer.body, media_type="application/json", headers={"ETag": answer.etag, **headers}
    )


def _plan_answer(
    ctx: ServiceContext,
    view: ModelView,
    digest: str | None,
    target: VersionNode | None,
    governing: GoverningRelease | None,
    key: AnswerKey,
) -> PlanAnswer:
    """The serialized plan; memoized in the view for a digest it publishes (or none)."""
    plan = plan_update(
        ctx,
        view,
        digest,
        target,
        governing.release if governing and target else None,
        canary=key[3],
    )
    shown = plan.target.digest if plan.target else (plan.current.digest if plan.current else "")
    bundle = f"|{plan.canary.sha256}" if plan.canary is not None else ""
    answer = PlanAnswer(
        etag=plan_etag(f"{shown}|{key[2]}{bundle}", digest),
        # no "canary" key at all without one: older agents forbid unknown fields
        body=plan.model_dump_json(exclude={"canary"} if plan.canary is None else None).encode(),
        status=plan.status,
        cheapest=plan.options[0].kind if plan.options else None,
    )
    if digest is None or digest in view.by_digest:
        view.answers[key] = answer
    return answer


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
            if body.release_id is not None:
                record_outcome(
                    session,
                    body.release_id,
                    device_id,
                    body.outcome,
                    body.reason,
                    body.bytes_downloaded,
                )

    await run_in_threadpool(store)
    if body.release_id is not None:
        ctx.catalog.invalidate(
            body.model
        )  # a halt takes effect here at once (elsewhere within the TTL)
    observe_report(body.outcome, body.reason)
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
