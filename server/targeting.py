"""Which version a device should run: the release rules applied to one device.

- A model that has never had a release serves its latest version to every device.
- Otherwise a device is governed by the most specific, then newest, of the model's
  active, paused or completed releases that select it (draft and halted releases are
  ignored). A paused release holds its devices where they are; an active or completed
  one offers its version to the devices inside its rollout percentage.
- A version older than the device's is offered only by an explicit rollback release.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from server.planning import VersionNode
from server.rollout import ReleaseView, choose_release, in_rollout

GOVERNING_STATES = frozenset({"active", "paused", "completed"})


@dataclass(frozen=True)
class GoverningRelease:
    release: ReleaseView
    state: str


@dataclass(frozen=True)
class Decision:
    target: VersionNode | None
    """The version to offer; ``None``: nothing to offer now."""
    release: GoverningRelease | None


def decide(
    versions: Mapping[int, VersionNode],
    latest: VersionNode | None,
    releases: Sequence[GoverningRelease] | None,
    device_id: str,
    tags: Mapping[str, str],
    current: VersionNode | None,
) -> Decision:
    """The decision for one device; ``releases`` is ``None`` for a model without any."""
    if releases is None:
        return Decision(latest, None)
    by_id = {g.release.id: g for g in releases}
    chosen = choose_release((g.release for g in releases), device_id, tags)
    if chosen is None:
        return Decision(None, None)
    governing = by_id[chosen.id]
    if governing.state == "paused" or not in_rollout(chosen, device_id):
        return Decision(None, governing)
    target = versions.get(chosen.version_id)
    if target is None:
        return Decision(None, governing)
    if current is not None and target.number < current.number and not chosen.rollback:
        return Decision(None, governing)
    return Decision(target, governing)
