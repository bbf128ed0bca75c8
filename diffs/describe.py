"""A human-oriented summary of a diff file: kinds, densities, bytes, bytes vs the bound."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from diffs.container import DiffReader
from diffs.positions import position_bound_bits


@dataclass(frozen=True)
class EntrySummary:
    tensor: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    changed: int
    """Elements the entry changes (hashed: every element; remove: none)."""
    section_bytes: dict[str, int]
    bound_bits: float
    """``log2(C(numel, changed))`` for kinds that code positions, else 0."""

    @property
    def density(self) -> float:
        return self.changed / self.numel if self.numel else 0.0

    @property
    def bytes(self) -> int:
        return sum(self.section_bytes.values())

    @property
    def position_ratio(self) -> float | None:
        """Coded position bits over the bound (``None`` where positions are not coded)."""
        coded = self.section_bytes.get("positions")
        if coded is None or self.bound_bits <= 0:
            return None
        return coded * 8 / self.bound_bits


@dataclass(frozen=True)
class DiffSummary:
    base_digest: str
    target_digest: str
    file_bytes: int
    entries: list[EntrySummary]
    info: dict[str, Any]

    @property
    def section_bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for entry, raw in zip(self.entries, out["entries"], strict=True):
            raw["density"] = entry.density
            raw["position_ratio"] = entry.position_ratio
        return out


def summarize(reader: DiffReader, file_bytes: int) -> DiffSummary:
    entries = []
    for index, spec in enumerate(reader.specs):
        if spec.kind in ("sparse", "exact"):
            changed = spec.count
        elif spec.kind == "remove":
            changed = 0
        else:
            changed = spec.numel
        coded = spec.kind in ("sparse", "exact")
        entries.append(
            EntrySummary(
                tensor=spec.name,
                kind=spec.kind,
                dtype=spec.dtype.value,
                shape=spec.shape,
                numel=spec.numel,
                changed=changed,
                section_bytes=reader.section_sizes(index),
                bound_bits=position_bound_bits(spec.numel, changed) if coded else 0.0,
            )
        )
    return DiffSummary(
        reader.base_digest, reader.target_digest, file_bytes, entries, dict(reader.manifest.info)
    )
