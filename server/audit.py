"""The audit log: every operator action, who, what, when, from where. Append-only."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session

from server.auth import Operator
from server.models import AuditRow


def record(
    session: Session,
    operator: Operator,
    action: str,
    target: str,
    request: Request | None = None,
    **detail: Any,
) -> None:
    """Add an audit entry in the caller's transaction (it commits with the action)."""
    remote = request.client.host if request is not None and request.client else None
    session.add(
        AuditRow(
            actor=f"{operator.name}#{operator.token_id}",
            action=action,
            target=target,
            remote=remote,
            detail={k: v for k, v in detail.items() if v is not None},
        )
    )
