"""Choosing how a device gets from its version to the target: pure functions, no I/O.

Candidates, each a list of downloads:

- ``chain``: the published diffs from the device's version up the parent links to the
  target (only when the device's version is an ancestor of the target);
- ``composed``: one exact diff from the device's version straight to the target
  (bit-identical to the chain; built on demand and cached by the caller);
- ``full``: the target's snapshot.

:func:`order_options` sorts them cheapest first (fewer steps win ties), so the plan's
order is also its fallback order; the full snapshot is always present as a last resort.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from diffs.wire import PlanOption, PlanStep


@dataclass(frozen=True)
class VersionNode:
    """What the planner needs to know of a version."""

    id: int
    number: int
    digest: str
    parent_id: int | None
    snapshot_sha256: str
    snapshot_size: int
    diff_sha256: str | None
    diff_size: int | None


@dataclass(frozen=True)
class BlobLink:
    """How a blob is named to devices: its download URL and its signed target path."""

    url: str
    target_path: str


def chain_between(
    versions: Mapping[int, VersionNode], from_id: int, to_id: int
) -> list[VersionNode] | None:
    """The versions whose diffs lead from ``from_id`` to ``to_id``, oldest first.

    ``None`` if ``from_id`` is not an ancestor of ``to_id`` (or a diff is missing).
    """
    path: list[VersionNode] = []
    node = versions.get(to_id)
    seen: set[int] = set()
    while node is not None and node.id != from_id:
        if node.id in seen or node.parent_id is None or node.diff_sha256 is None:
            return None
        seen.add(node.id)
        path.append(node)
        node = versions.get(node.parent_id)
    if node is None:
        return None
    path.reverse()
    return path


def chain_option(
    versions: Mapping[int, VersionNode],
    chain: Sequence[VersionNode],
    links: Mapping[str, BlobLink],
) -> PlanOption:
    steps = []
    for node in chain:
        assert node.parent_id is not None and node.diff_sha256 is not None
        assert node.diff_size is not None
        link = links[node.diff_sha256]
        steps.append(
            PlanStep(
                kind="diff",
                url=link.url,
                target_path=link.target_path,
                sha256=node.diff_sha256,
                size=node.diff_size,
                source_digest=versions[node.parent_id].digest,
                target_digest=node.digest,
            )
        )
    return PlanOption(kind="chain", total_bytes=sum(s.size for s in steps), steps=steps)


def composed_option(
    source: VersionNode, target: VersionNode, sha256: str, size: int, link: BlobLink
) -> PlanOption:
    step = PlanStep(
        kind="composed",
        url=link.url,
        target_path=link.target_path,
        sha256=sha256,
        size=size,
        source_digest=source.digest,
        target_digest=target.digest,
    )
    return PlanOption(kind="composed", total_bytes=size, steps=[step])


def full_option(target: VersionNode, link: BlobLink) -> PlanOption:
    step = PlanStep(
        kind="snapshot",
        url=link.url,
        target_path=link.target_path,
        sha256=target.snapshot_sha256,
        size=target.snapshot_size,
        source_digest=None,
        target_digest=target.digest,
    )
    return PlanOption(kind="full", total_bytes=target.snapshot_size, steps=[step])


def order_options(options: Sequence[PlanOption]) -> list[PlanOption]:
    """Cheapest first, fewer steps on ties; the full snapshot stays as the last resort."""
    full = [o for o in options if o.kind == "full"]
    rest = sorted(
        (o for o in options if o.kind != "full"), key=lambda o: (o.total_bytes, len(o.steps))
    )
    cheaper_than_full = [o for o in rest if not full or o.total_bytes < full[0].total_bytes]
    return cheaper_than_full + full
