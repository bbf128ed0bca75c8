"""Operator API tokens (admin only): create (shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Request, status
from sqlalchemy import select

from server.api.deps import Admin, Context
from server.audit import record
from server.auth import Scope, new_secret, secret_hash
from server.db import transaction
from server.errors import NotFoundError
from server.models import ApiTokenRow
from server.schemas import TokenCreate, TokenCreated, TokenPublic

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post("", status_code=status.HTTP_201_CREATED)
def create_token(
    body: TokenCreate, request: Request, ctx: Context, operator: Admin
) -> TokenCreated:
    secret = new_secret("dct")
    with transaction(ctx.sessions) as session:
        row = ApiTokenRow(
            name=body.name,
            token_hash=secret_hash(secret),
            scopes=[s.value for s in body.scopes],
            revoked=False,
        )
        session.add(row)
        session.flush()
        session.refresh(row)
        record(
            session,
            operator,
            "token.create",
            f"token/{row.id}",
            request,
            scopes=row.scopes,
            name=row.name,
        )
    return TokenCreated(
        id=row.id,
        name=row.name,
        scopes=body.scopes,
        revoked=False,
        created_at=row.created_at,
        token=secret,
    )


@router.get("")
def list_tokens(ctx: Context, _: Admin) -> list[TokenPublic]:
    with ctx.sessions() as session:
        return [
            TokenPublic(
                id=r.id,
                name=r.name,
                scopes=[Scope(s) for s in r.scopes],
                revoked=r.revoked,
                created_at=r.created_at,
            )
            for r in session.scalars(select(ApiTokenRow).order_by(ApiTokenRow.id))
        ]


@router.delete("/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(token_id: int, request: Request, ctx: Context, operator: Admin) -> None:
    with transaction(ctx.sessions) as session:
        row = session.get(ApiTokenRow, token_id)
        if row is None:
            raise NotFoundError(f"no token {token_id}")
        row.revoked = True
        record(session, operator, "token.revoke", f"token/{token_id}", request)
