"""Walking a chain of diffs over a base model, one tensor at a time, proving every digest.

:func:`walk_chain` visits the union of all tensor names in canonical order; for each it
runs the tensor through every diff of the chain and yields its base and final versions.
Meanwhile it feeds every intermediate model's canonical digest, so after the last tensor
it has checked each diff's declared target -- without ever holding more than one tensor
(and one decoded entry) in memory. Composing diffs and rewriting a model file are both
built on it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from diffs.container import Diff, DiffReader
from diffs.digest import ModelHasher, model_digest
from diffs.dtypes import DType
from diffs.entries import AddEntry, Entry, ReplaceEntry, apply_entry
from diffs.errors import BaseMismatchError, IncompatibleModelError, TargetMismatchError
from diffs.model import Model, Tensor
from diffs.safetensors_file import TensorLayout, sort_key

Update = Diff | DiffReader
"""A diff in memory or a diff file being read."""


@dataclass(frozen=True)
class StepIndex:
    """What one diff does to which tensors, without decoding any entry."""

    update: Update
    kinds: dict[str, tuple[str, DType, tuple[int, ...]]]
    positions: dict[str, int]

    @classmethod
    def of(cls, update: Update) -> StepIndex:
        if isinstance(update, DiffReader):
            kinds = {s.name: (s.kind, s.dtype, s.shape) for s in update.specs}
            positions = {s.name: i for i, s in enumerate(update.specs)}
        else:
            kinds = {e.name: _describe(e) for e in update.entries}
            positions = {e.name: i for i, e in enumerate(update.entries)}
        if len(positions) != (
            len(update.specs) if isinstance(update, DiffReader) else len(update.entries)
        ):
            raise IncompatibleModelError("a diff changes the same tensor twice")
        return cls(update, kinds, positions)

    def entry(self, name: str) -> Entry | None:
        index = self.positions.get(name)
        if index is None:
            return None
        if isinstance(self.update, DiffReader):
            return self.update.entry(index)
        return self.update.entries[index]


def _describe(entry: Entry) -> tuple[str, DType, tuple[int, ...]]:
    if isinstance(entry, ReplaceEntry | AddEntry):
        return entry.kind, entry.tensor.dtype, entry.tensor.shape
    return entry.kind, entry.dtype, entry.shape


def check_links(base_digest: str, updates: Sequence[Update]) -> None:
    """Each diff's base must be the previous diff's target (the first: ``base_digest``)."""
    expected = base_digest
    for number, update in enumerate(updates, 1):
        if update.base_digest != expected:
            raise BaseMismatchError(
                f"diff {number} of the chain applies to {update.base_digest}, "
                f"but the model before it is {expected}",
                expected=update.base_digest,
                actual=expected,
            )
        expected = update.target_digest


def layouts_after(base: Model, steps: Sequence[StepIndex]) -> list[dict[str, TensorLayout]]:
    """The tensor layouts present after each step (from the manifests alone)."""
    current = {name: TensorLayout(name, t.dtype, t.shape) for name, t in base.items()}
    result = []
    for step in steps:
        current = dict(current)
        for name, (kind, dtype, shape) in step.kinds.items():
            if kind == "remove":
                current.pop(name, None)
            elif kind in ("replace", "add"):
                current[name] = TensorLayout(name, dtype, shape)
        result.append(current)
    return result


def walk_chain(
    base: Model, updates: Sequence[Update], *, base_digest: str | None = None
) -> Iterator[tuple[str, Tensor | None, Tensor | None]]:
    """Yield ``(name, base tensor, final tensor)`` in canonical name order.

    Raises :class:`BaseMismatchError` before yielding anything if the chain does not
    start at ``base`` (or does not link up), and :class:`TargetMismatchError` after the
    last tensor if any diff's declared target is not what applying it gave.
    """
    actual = base_digest if base_digest is not None else model_digest(base)
    check_links(actual, updates)
    steps = [StepIndex.of(u) for u in updates]
    hashers = [ModelHasher(len(layout)) for layout in layouts_after(base, steps)]
    names = set(base).union(*(step.kinds for step in steps))
    for name in sorted(names, key=sort_key):
        original = base.get(name)
        current = original
        for step, hasher in zip(steps, hashers, strict=True):
            entry = step.entry(name)
            if entry is not None:
                current = apply_entry(current, entry)
            if current is not None:
                hasher.add_array(name, current.dtype, current.array)
        yield name, original, current
    for number, (update, hasher) in enumerate(zip(updates, hashers, strict=True), 1):
        got = hasher.hexdigest()
        if got != update.target_digest:
            raise TargetMismatchError(
                f"diff {number} of the chain declares target {update.target_digest}, "
                f"applying it gave {got}",
                expected=update.target_digest,
                actual=got,
            )


def apply_chain(base: Model, updates: Sequence[Update]) -> dict[str, Tensor]:
    """The model after every diff of the chain, all digests checked (in memory)."""
    result: dict[str, Tensor] = {}
    for name, _, final in walk_chain(base, updates):
        if final is not None:
            result[name] = final
    return result
