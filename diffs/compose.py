"""Composing a chain of diffs a -> b -> ... -> z into one exact diff a -> z.

The sparse and hashed additions round at every step, so their composition is not a sum
of deltas; the only composition that is bit-identical to applying the chain is the exact
diff between the base and the chain's result. :func:`compose` computes it one tensor at
a time (with every intermediate digest checked on the way), so a server can build a
composed update for any device version without materializing intermediate models.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffs.chain import Update, walk_chain
from diffs.container import Diff
from diffs.digest import model_digest
from diffs.entries import Entry
from diffs.make import exact_entry
from diffs.model import Model


def compose(base: Model, updates: Sequence[Update], *, base_digest: str | None = None) -> Diff:
    """One exact diff equal to applying ``updates`` to ``base`` in order."""
    if not updates:
        raise ValueError("composing needs at least one diff")
    digest = base_digest if base_digest is not None else model_digest(base)
    entries: list[Entry] = []
    for name, original, final in walk_chain(base, updates, base_digest=digest):
        entry = exact_entry(name, original, final)
        if entry is not None:
            entries.append(entry)
    info = {"method": "composed", "chain": [u.target_digest for u in updates]}
    return Diff(digest, updates[-1].target_digest, entries, info)
