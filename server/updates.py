"""Answering a device's poll: "nothing to do", or an update plan with its fallbacks.

An up-to-date device is answered from the in-memory catalog alone (no database query,
no write). A device that needs an update gets the chain, a composed diff (built once per
version pair, then cached content-addressed) and the full snapshot, cheapest first.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from diffs.container import write_diff
from diffs.make import make_exact
from diffs.model import ModelFile
from diffs.wire import CanaryRef, PlanOption, UpdatePlan, VersionRef
from server.catalog import ModelView
from server.context import (
    ServiceContext,
    blob_url,
    canary_path,
    composed_path,
    diff_path,
    snapshot_path,
)
from server.db import transaction
from server.models import BlobRow, ComposedDiffRow
from server.planning import (
    BlobLink,
    VersionNode,
    chain_between,
    chain_option,
    composed_option,
    full_option,
    order_options,
)
from server.rollout import ReleaseView
from server.trust.repository import TargetSpec
from server.uploads import file_sha256


def plan_etag(target_digest: str, device_digest: str | None) -> str:
    key = f"{target_digest}|{device_digest}".encode()
    return '"' + hashlib.sha256(key).hexdigest()[:32] + '"'


def plan_update(
    ctx: ServiceContext,
    view: ModelView,
    device_digest: str | None,
    target: VersionNode | None,
    release: ReleaseView | None = None,
    *,
    canary: bool = False,
) -> UpdatePlan:
    """The plan that takes a device running ``device_digest`` to ``target`` (``None``:
    nothing to offer). Under a rollback release every step is signed as a rollback, the
    only way a device accepts an older version. With ``canary`` (the agent runs canary
    checks) the plan names the release's canary bundle, if it has one."""
    current = view.by_digest.get(device_digest) if device_digest else None
    if target is None or device_digest == target.digest:
        return UpdatePlan(status="current", current=_ref(view, current))
    rollback = release is not None and release.rollback
    links = {
        node.diff_sha256: BlobLink(
            blob_url(node.diff_sha256), diff_path(view.name, node.diff_sha256)
        )
        for node in view.versions.values()
        if node.diff_sha256
    }
    snapshot = BlobLink(
        blob_url(target.snapshot_sha256), snapshot_path(view.name, target.snapshot_sha256)
    )
    options = [full_option(target, snapshot)]
    if current is not None:
        chain = None if rollback else chain_between(view.versions, current.id, target.id)
        if chain:
            options.append(chain_option(view.versions, chain, links))
        if chain is None or len(chain) > 1:
            sha, size = composed_blob(ctx, view, current, target)
            link = BlobLink(blob_url(sha), composed_path(view.name, sha))
            options.append(composed_option(current, target, sha, size, link))
    ordered = order_options(options)
    if rollback:
        assert release is not None
        ordered = [sign_rollback(ctx, view, option, target, release.id) for option in ordered]
    return UpdatePlan(
        status="update",
        target=_ref(view, target),
        current=_ref(view, current),
        options=ordered,
        rollback=rollback,
        release_id=release.id if release is not None else None,
        canary=_canary(view, release) if canary else None,
    )


def _canary(view: ModelView, release: ReleaseView | None) -> CanaryRef | None:
    if release is None or release.canary is None:
        return None
    bundle = release.canary
    return CanaryRef(
        url=blob_url(bundle.sha256),
        target_path=canary_path(view.name, release.id, bundle.sha256),
        sha256=bundle.sha256,
        size=bundle.size,
        max_wer=bundle.max_wer,
        clips=bundle.clips,
    )


def sign_rollback(
    ctx: ServiceContext, view: ModelView, option: PlanOption, target: VersionNode, release_id: int
) -> PlanOption:
    """The option with each step re-signed under a rollback path of this release."""
    steps = []
    specs = []
    for step in option.steps:
        name = step.target_path.split("/", 1)[1]
        path = f"{view.name}/rollback{release_id}-{name}"
        custom = {
            "kind": step.kind,
            "digest": step.target_digest,
            "version": target.number,
            "rollback_release": release_id,
        }
        if step.source_digest is not None:
            custom["source_digest"] = step.source_digest
        specs.append(TargetSpec(path, step.size, step.sha256, custom))
        steps.append(step.model_copy(update={"target_path": path}))
    fresh = [spec for spec in specs if spec.path not in ctx.signed_paths]
    if fresh:
        ctx.trust.add_targets(view.name, fresh)
        ctx.signed_paths.update(spec.path for spec in fresh)
    return option.model_copy(update={"steps": steps})


def _ref(view: ModelView, node: VersionNode | None) -> VersionRef | None:
    return (
        None
        if node is None
        else VersionRef(model=view.name, version=node.number, digest=node.digest)
    )


def composed_blob(
    ctx: ServiceContext, view: ModelView, source: VersionNode, target: VersionNode
) -> tuple[str, int]:
    """The exact diff ``source -> target``: cached, else built, stored and signed once."""
    key = (source.id, target.id)
    cached = ctx.composed_cache.get(key)
    if cached is not None:
        return cached
    with ctx.sessions() as session:
        row = session.scalar(
            select(ComposedDiffRow).where(
                ComposedDiffRow.from_version_id == source.id,
                ComposedDiffRow.to_version_id == target.id,
            )
        )
        if row is not None:
            found = (row.blob_sha256, row.blob.size)
            ctx.composed_cache[key] = found
            return found
    ctx.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.tmp_dir, prefix="compose-") as tmp:
        scratch = Path(tmp)
        files = []
        for node in (source, target):
            local = ctx.blobs.local_path(node.snapshot_sha256)
            if local is None:
                local = scratch / f"{node.id}.safetensors"
                ctx.blobs.fetch_to(node.snapshot_sha256, local)
            files.append(local)
        out = scratch / "composed.diff"
        with (
            ModelFile(files[0], limits=ctx.limits) as a,
            ModelFile(files[1], limits=ctx.limits) as b,
        ):
            diff = make_exact(
                a, b, {"method": "composed", "from": source.number, "to": target.number}
            )
        write_diff(out, diff)
        sha, size = file_sha256(out), out.stat().st_size
        ctx.blobs.put_file(out, sha, size)
    ctx.trust.add_targets(
        view.name,
        [
            TargetSpec(
                composed_path(view.name, sha),
                size,
                sha,
                {
                    "kind": "composed",
                    "digest": target.digest,
                    "source_digest": source.digest,
                    "version": target.number,
                },
            )
        ],
    )
    try:
        with transaction(ctx.sessions) as session:
            if session.get(BlobRow, sha) is None:
                session.add(BlobRow(sha256=sha, size=size, kind="composed"))
            session.add(
                ComposedDiffRow(from_version_id=source.id, to_version_id=target.id, blob_sha256=sha)
            )
    except IntegrityError:
        pass  # another worker cached the same (deterministic) diff first
    ctx.composed_cache[key] = (sha, size)
    return sha, size
