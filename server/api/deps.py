"""Request dependencies as ``Annotated`` aliases: the service context and credentials."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from server.auth import DeviceIdentity, Operator, Scope, secret_hash
from server.context import ServiceContext
from server.errors import AuthenticationError, PermissionDeniedError
from server.models import ApiTokenRow, DeviceRow


def get_context(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.context
    return ctx


Context = Annotated[ServiceContext, Depends(get_context)]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthenticationError("missing credential: send 'Authorization: Bearer <token>'")
    return value.strip()


def current_operator(request: Request, ctx: Context) -> Operator:
    hashed = secret_hash(_bearer(request))
    with ctx.sessions() as session:
        row = session.scalar(select(ApiTokenRow).where(ApiTokenRow.token_hash == hashed))
    if row is None or row.revoked:
        raise AuthenticationError("unknown or revoked API token")
    return Operator(row.id, row.name, frozenset(Scope(s) for s in row.scopes))


def _require(scope: Scope):  # type: ignore[no-untyped-def]
    def check(operator: Annotated[Operator, Depends(current_operator)]) -> Operator:
        if not operator.can(scope):
            raise PermissionDeniedError(f"this token lacks the {scope.value!r} scope")
        return operator

    return check


Reader = Annotated[Operator, Depends(_require(Scope.READ))]
Publisher = Annotated[Operator, Depends(_require(Scope.PUBLISH))]
Admin = Annotated[Operator, Depends(_require(Scope.ADMIN))]


async def current_device(request: Request, device_id: str) -> DeviceIdentity:
    """The device whose credential this is; it must be the device named in the path.

    Credentials are cached per worker, so a known device costs no database query; it
    runs on the event loop (no thread hop), and only a cache miss queries in a thread.
    """
    hashed = secret_hash(_bearer(request))
    cache: dict[str, DeviceIdentity] = request.app.state.device_credentials
    owner = cache.get(hashed)
    if owner is None:
        ctx = get_context(request)

        def lookup() -> DeviceIdentity | None:
            with ctx.sessions() as session:
                row = session.execute(
                    select(DeviceRow.id, DeviceRow.tags).where(DeviceRow.credential_hash == hashed)
                ).first()
            return None if row is None else DeviceIdentity(row[0], dict(row[1] or {}))

        owner = await run_in_threadpool(lookup)
        if owner is None:
            raise AuthenticationError("unknown device credential")
        cache[hashed] = owner
    if owner.device_id != device_id:
        raise PermissionDeniedError("a device may only act as itself")
    return owner


Device = Annotated[DeviceIdentity, Depends(current_device)]
