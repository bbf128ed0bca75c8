"""Signed TUF metadata, as python-tuf's client asks for it (consistent snapshots)."""

from __future__ import annotations

import json
import re

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from server.api.deps import Admin, Context
from server.audit import record
from server.db import transaction
from server.errors import BadRequestError, NotFoundError
from server.schemas import ProvisioningBundle

router = APIRouter(tags=["trust"])
_NAME = re.compile(r"^(\d+\.)?[A-Za-z0-9_-]{1,140}\.json$")


@router.get("/tuf/{filename}")
async def metadata(filename: str, ctx: Context) -> Response:
    if not _NAME.match(filename):
        raise NotFoundError(f"no metadata file {filename!r}")
    if filename == "timestamp.json":
        await run_in_threadpool(ctx.trust_refresh.maybe_refresh)
    body = await run_in_threadpool(ctx.trust.metadata_file, filename)
    versioned = filename[0].isdigit()
    cache = "public, max-age=31536000, immutable" if versioned else "no-cache"
    return Response(body, media_type="application/json", headers={"Cache-Control": cache})


@router.post(
    "/v1/trust/root",
    status_code=204,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def publish_root(request: Request, ctx: Context, operator: Admin) -> None:
    """Publish root metadata N+1 (made offline by ``diffcast keys rotate-root``).

    It must be signed by a threshold of the current root's keys and of its own; devices
    then follow the rotation one version at a time.
    """
    body = await request.body()
    if len(body) > 512_000:
        raise BadRequestError("root metadata larger than 512 kB")
    await run_in_threadpool(ctx.trust.publish_root, body)
    version = json.loads(body)["signed"]["version"]
    with transaction(ctx.sessions) as session:
        record(session, operator, "trust.publish_root", f"root/{version}", request)


@router.get("/v1/provisioning")
def provisioning(ctx: Context, _: Admin) -> ProvisioningBundle:
    """The bundle a device is provisioned with: the trusted root and the enrollment secret."""
    secret = ctx.settings.enrollment_secret
    if not secret:
        raise NotFoundError("no enrollment secret is configured (DIFFCAST_ENROLLMENT_SECRET)")
    root = json.loads(ctx.trust.metadata_file("1.root.json"))
    return ProvisioningBundle(trusted_root=root, enrollment_secret=secret)
