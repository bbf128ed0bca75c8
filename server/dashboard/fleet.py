"""Read-only JSON the dashboard draws from: who the token is, the fleet by version, report
outcomes over time, and device search. Any token with the ``read`` scope may call them.

``GET /v1/whoami``             the token's name and scopes
``GET /v1/fleet/summary``      devices per model and version, last outcomes, bytes saved
``GET /v1/fleet/timeline``     report outcomes, failure reasons and bytes per time bucket
``GET /v1/fleet/devices?q=``   device search (see :func:`search_filters`)

Everything is aggregated in the database (``GROUP BY``), so the answers stay small
whatever the fleet's size.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import BigInteger, ColumnElement, cast, extract, func, literal_column, select
from sqlalchemy.orm import Session

from server.api.deps import Context, Reader, current_operator
from server.auth import Operator, Scope
from server.dashboard.schemas import FleetSummary, ModelFleet, Timeline, VersionCount, WhoAmI
from server.dashboard.series import APPLIED_OUTCOME, GroupedReports, Window, fold
from server.errors import BadRequestError
from server.models import BlobRow, DeviceRow, ModelRow, ReportRow, VersionRow
from server.schemas import DevicePublic

router = APIRouter(tags=["dashboard"])


@router.get("/v1/whoami")
def whoami(operator: Annotated[Operator, Depends(current_operator)]) -> WhoAmI:
    """The calling token: its name and scopes (any valid token may ask)."""
    return WhoAmI(
        name=operator.name,
        scopes=sorted(operator.scopes),
        effective_scopes=[s for s in Scope if operator.can(s)],
    )


def _full_size_join(query: Any) -> Any:
    """Outer-join each report to the snapshot blob of the version it updated to."""
    return (
        query.outerjoin(ModelRow, ModelRow.name == ReportRow.model_name)
        .outerjoin(
            VersionRow,
            (VersionRow.model_id == ModelRow.id) & (VersionRow.number == ReportRow.to_version),
        )
        .outerjoin(BlobRow, BlobRow.sha256 == VersionRow.snapshot_sha256)
    )


@router.get("/v1/fleet/summary")
def fleet_summary(ctx: Context, _: Reader) -> FleetSummary:
    """Devices per model and version (the fleet's version distribution), devices by the
    outcome they last reported, and bytes downloaded against full snapshots."""
    with ctx.sessions() as session:
        latest = dict(
            session.execute(
                select(ModelRow.name, func.max(VersionRow.number))
                .join(VersionRow, VersionRow.model_id == ModelRow.id)
                .group_by(ModelRow.name)
            ).all()
        )
        per_version = session.execute(
            select(DeviceRow.model_name, DeviceRow.version_number, func.count()).group_by(
                DeviceRow.model_name, DeviceRow.version_number
            )
        ).all()
        outcomes = session.execute(
            select(DeviceRow.last_outcome, func.count()).group_by(DeviceRow.last_outcome)
        ).all()
        downloaded, full = session.execute(
            _full_size_join(
                select(
                    func.coalesce(func.sum(ReportRow.bytes_downloaded), 0),
                    func.coalesce(func.sum(BlobRow.size), 0),
                )
            ).where(ReportRow.outcome == APPLIED_OUTCOME)
        ).one()
    models: dict[str, list[VersionCount]] = {}
    unreported = 0
    for model, version, count in per_version:
        if model is None:
            unreported += count
        else:
            models.setdefault(model, []).append(VersionCount(version=version, devices=count))
    fleets = [
        ModelFleet(
            model=name,
            latest=latest.get(name),
            devices=sum(v.devices for v in versions),
            versions=sorted(versions, key=lambda v: (v.version is None, -(v.version or 0))),
        )
        for name, versions in sorted(models.items())
    ]
    return FleetSummary(
        devices=unreported + sum(f.devices for f in fleets),
        unreported=unreported,
        models=fleets,
        last_outcomes={str(o): n for o, n in outcomes if o is not None},
        bytes_downloaded=int(downloaded),
        bytes_full_equivalent=int(full),
    )


def _epoch(session: Session, column: Any) -> ColumnElement[int]:
    """Whole seconds since 1970 (UTC) of a timestamp column, on SQLite or PostgreSQL."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.floor(extract("epoch", column)), BigInteger)
    return cast(func.strftime("%s", column), BigInteger)


@router.get("/v1/fleet/timeline")
def fleet_timeline(
    ctx: Context,
    _: Reader,
    hours: Annotated[int, Query(ge=1, le=24 * 90)] = 24,
    buckets: Annotated[int, Query(ge=1, le=500)] = 24,
    model: Annotated[str | None, Query(max_length=128)] = None,
    version: Annotated[int | None, Query(ge=0)] = None,
) -> Timeline:
    """Device reports per time bucket over the last ``hours``: outcomes, failure reasons,
    and bytes of applied updates against full snapshots. ``model`` and ``version`` narrow
    it to the reports of one release's target."""
    window = Window.ending_at(time.time(), hours, buckets)
    with ctx.sessions() as session:
        # Literal integers, not parameters: PostgreSQL must see the GROUP BY expression
        # and the selected one as the same text.
        start = literal_column(str(window.start), BigInteger)
        size = literal_column(str(window.seconds), BigInteger)
        bucket = ((_epoch(session, ReportRow.created_at) - start) // size).label("bucket")
        query = _full_size_join(
            select(
                bucket,
                ReportRow.outcome,
                ReportRow.reason,
                func.count(),
                func.coalesce(func.sum(ReportRow.bytes_downloaded), 0),
                func.coalesce(func.sum(BlobRow.size), 0),
            )
        ).where(_epoch(session, ReportRow.created_at) >= start)
        if model is not None:
            query = query.where(ReportRow.model_name == model)
        if version is not None:
            query = query.where(ReportRow.to_version == version)
        rows = session.execute(query.group_by(bucket, ReportRow.outcome, ReportRow.reason)).all()
    return fold(
        window,
        (
            GroupedReports(int(b), str(o), r, int(n), int(down), int(full))
            for b, o, r, n, down, full in rows
        ),
    )


def search_filters(q: str) -> list[ColumnElement[bool]]:
    """The conditions a search string means; every word must match.

    ``model:NAME``, ``version:N`` (or ``vN``), ``outcome:WORD`` match those fields;
    ``key=value`` matches a tag; any other word matches part of the device id.
    """
    conditions: list[ColumnElement[bool]] = []
    for word in q.split():
        field, colon, value = word.partition(":")
        if colon and field == "model":
            conditions.append(DeviceRow.model_name == value)
        elif colon and field == "outcome":
            conditions.append(DeviceRow.last_outcome == value)
        elif (colon and field == "version") or (word[:1] == "v" and word[1:].isdigit()):
            number = value if colon else word[1:]
            if not number.isdigit():
                raise BadRequestError(f"not a version number: {number!r}")
            conditions.append(DeviceRow.version_number == int(number))
        elif "=" in word:
            key, _, tag = word.partition("=")
            conditions.append(DeviceRow.tags[key].as_string() == tag)
        else:
            conditions.append(func.lower(DeviceRow.id).contains(word.lower(), autoescape=True))
    return conditions


@router.get("/v1/fleet/devices")
def search_devices(
    ctx: Context,
    _: Reader,
    q: Annotated[str, Query(max_length=200)] = "",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[DevicePublic]:
    """Devices matching ``q`` (see :func:`search_filters`), by id."""
    query = select(DeviceRow).where(*search_filters(q)).order_by(DeviceRow.id).limit(limit)
    with ctx.sessions() as session:
        return [
            DevicePublic(
                id=row.id,
                tags=row.tags,
                model=row.model_name,
                version=row.version_number,
                digest=row.digest,
                last_outcome=row.last_outcome,
                last_seen=row.last_seen,
                enrolled_at=row.enrolled_at,
            )
            for row in session.scalars(query)
        ]
