"""Making diffs from two checkpoints: exact, or a sparse/hashed approximation at a budget.

- :func:`make_exact`: lossless; the XOR of the bit patterns wherever they differ, plus
  add/remove/replace for tensors that appear, vanish, or change dtype or shape.
- :func:`make_sparse`: keep the ``k`` largest deltas (optionally weighted by an
  importance such as a Fisher estimate), with ``k`` the most that fit ``budget_bytes``.
- :func:`make_hashed`: one fitted value per bucket of the hashed map, as many buckets
  as fit ``budget_bytes``.

The approximations change the target: the diff's target digest is that of the base with
the diff applied (computed exactly, by the same arithmetic a device uses), and an
:class:`ApproxReport` says how far that lands from the requested checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from diffs.container import DEFAULT_OPTIONS, Diff, EncodeOptions, diff_bytes
from diffs.digest import model_digest
from diffs.dtypes import to_compute
from diffs.entries import (
    AddEntry,
    Entry,
    ExactEntry,
    HashedEntry,
    RemoveEntry,
    ReplaceEntry,
    SparseEntry,
    apply_entry,
)
from diffs.hashing import CHUNK, bucket_and_sign
from diffs.model import Model, Tensor
from diffs.positions import position_bound_bits
from diffs.safetensors_file import sort_key
from diffs.values import ValueFormat, Values

ENTRY_OVERHEAD_BYTES = 160
"""Rough bytes of header and manifest per entry, for budgeting."""


@dataclass(frozen=True)
class ApproxReport:
    """How an approximate diff compares with the exact update it stands for."""

    method: str
    budget_bytes: int
    encoded_bytes: int
    kept: int
    """Sparse: entries kept; hashed: buckets."""
    changed: int
    """Elements the exact update changes."""
    rel_l2_error: float
    """||target - result|| / ||target - base|| over the float tensors (0 = exact)."""
    max_abs_error: float


def make_exact(base: Model, target: Model, info: Mapping[str, Any] | None = None) -> Diff:
    """A lossless diff: applying it to ``base`` gives ``target`` bit for bit."""
    entries: list[Entry] = []
    for name in sorted(set(base) | set(target), key=sort_key):
        old, new = base.get(name), target.get(name)
        entry = exact_entry(name, old, new)
        if entry is not None:
            entries.append(entry)
    return Diff(
        model_digest(base), model_digest(target), entries, dict(info or {"method": "exact"})
    )


def exact_entry(name: str, old: Tensor | None, new: Tensor | None) -> Entry | None:
    """The lossless entry that turns ``old`` into ``new`` (``None``: nothing changed)."""
    if new is None:
        return None if old is None else RemoveEntry(name, old.dtype, old.shape)
    if old is None:
        return AddEntry(name, new)
    if old.dtype is not new.dtype or old.shape != new.shape:
        return ReplaceEntry(name, new)
    bits = old.dtype.bits
    a = np.ascontiguousarray(old.array).reshape(-1).view(bits)
    b = np.ascontiguousarray(new.array).reshape(-1).view(bits)
    positions = np.flatnonzero(a != b)
    if positions.size == 0:
        return None
    return ExactEntry(name, old.dtype, old.shape, positions, a[positions] ^ b[positions])


def _float_pairs(base: Model, target: Model) -> list[str]:
    """Tensors present in both with the same float dtype and shape (approximable)."""
    return [
        name
        for name in sorted(set(base) & set(target), key=sort_key)
        if base[name].dtype.is_float
        and base[name].dtype is target[name].dtype
        and base[name].shape == target[name].shape
    ]


def _delta(base: Tensor, target: Tensor) -> npt.NDArray[np.float64]:
    return to_compute(target.array.reshape(-1), target.dtype).astype(np.float64) - to_compute(
        base.array.reshape(-1), base.dtype
    ).astype(np.float64)


def make_sparse(
    base: Model,
    target: Model,
    budget_bytes: int,
    value_format: ValueFormat = ValueFormat.F16,
    importance: Mapping[str, npt.NDArray[Any]] | None = None,
    options: EncodeOptions = DEFAULT_OPTIONS,
) -> tuple[Diff, ApproxReport]:
    """Top-k sparse approximation of ``base -> target`` that encodes within ``budget_bytes``."""
    names = _float_pairs(base, target)
    fixed = _exact_rest(base, target, set(names))
    deltas = {name: _delta(base[name], target[name]) for name in names}
    scores = {
        name: np.abs(d)
        * (importance[name].reshape(-1) if importance and name in importance else 1.0)
        for name, d in deltas.items()
    }
    changed = int(sum(np.count_nonzero(d) for d in deltas.values()))
    fixed_bytes = len(diff_bytes(Diff(_ZERO, _ZERO, fixed), options)) if fixed else 0
    value_bytes = value_format.bits_per_value / 8
    all_scores = np.concatenate([s for s in scores.values()]) if scores else np.zeros(0)
    nonzero = int(np.count_nonzero(all_scores))

    def build(k: int) -> Diff:
        thresh = _kth_largest(all_scores, k)
        entries = list(fixed)
        for name in names:
            keep = (
                np.flatnonzero((scores[name] >= thresh) & (scores[name] > 0))
                if k
                else np.zeros(0, np.int64)
            )
            if keep.size:
                values = Values.quantize(deltas[name][keep], value_format)
                entries.append(SparseEntry(name, base[name].dtype, base[name].shape, keep, values))
        return Diff(_ZERO, _ZERO, entries, {"method": "sparse", "budget_bytes": budget_bytes})

    def estimate(k: int) -> float:
        thresh = _kth_largest(all_scores, k)
        total = fixed_bytes + 64.0
        for name in names:
            kt = int(np.count_nonzero((scores[name] >= thresh) & (scores[name] > 0))) if k else 0
            if kt:
                n = scores[name].size
                total += (
                    position_bound_bits(n, kt) * 1.02 / 8 + kt * value_bytes + ENTRY_OVERHEAD_BYTES
                )
        return total

    lo, hi = 0, nonzero
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    k = lo
    diff = build(k)
    size = len(diff_bytes(diff, options))
    while size > budget_bytes and k > 0:
        k = int(k * min(0.98, budget_bytes / size))
        diff = build(k)
        size = len(diff_bytes(diff, options))
    k, diff = _grow_to_budget(build, k, diff, size, nonzero, budget_bytes, options)
    return _finish(base, target, diff, "sparse", budget_bytes, k, changed, names, options)


GROW_ENCODES = 6
"""Most trial encodes spent filling the budget past the estimate."""


def _grow_to_budget(
    build: Callable[[int], Diff],
    k: int,
    diff: Diff,
    size: int,
    most: int,
    budget_bytes: int,
    options: EncodeOptions,
) -> tuple[int, Diff]:
    """The largest ``k`` found (in a few trial encodes) whose diff still fits.

    The estimate assumes uniformly spread positions and incompressible values; real deltas
    cluster and their values compress, so it leaves part of the budget unused (10-20% for
    trained deltas). Starting from ``k`` (which fits), the next guess scales ``k`` by the
    bytes left, then halves the interval between the largest fit and the smallest miss,
    until they are within 0.5% of each other or the diff is within 0.5% of the budget.
    """
    miss: int | None = None
    for _ in range(GROW_ENCODES):
        if budget_bytes - size <= budget_bytes // 200:
            break
        scaled = min(most, int(k * budget_bytes / max(size, 1)))
        guess = scaled if miss is None else (k + miss) // 2
        if guess <= k or (miss is not None and miss - k <= max(1, k // 200)):
            break
        trial = build(guess)
        trial_size = len(diff_bytes(trial, options))
        if trial_size <= budget_bytes:
            k, diff, size = guess, trial, trial_size
        else:
            miss = guess
    return k, diff


def sparse_capacity(
    base: Model,
    names: Sequence[str],
    budget_bytes: int,
    value_format: ValueFormat = ValueFormat.F16,
    options: EncodeOptions = DEFAULT_OPTIONS,
) -> int:
    """How many sparse entries over ``names`` fit ``budget_bytes``, for planning.

    Sized by encoding trial diffs -- entries spread over the tensors in proportion to
    their sizes at random positions, with incompressible values -- so a trainer can prune
    toward it; :func:`make_sparse` then fits the real entries exactly.
    """
    sizes = [base[n].array.size for n in names]
    total = sum(sizes)
    rng = np.random.default_rng(0)
    scale = 1e-3

    def encoded(k: int) -> int:
        entries: list[Entry] = []
        for name, n in zip(names, sizes, strict=True):
            kt = min(n, round(k * n / total))
            if kt:
                positions = np.sort(rng.choice(n, kt, replace=False)).astype(np.int64)
                values = Values.quantize(rng.standard_normal(kt) * scale, value_format)
                tensor = base[name]
                entries.append(SparseEntry(name, tensor.dtype, tensor.shape, positions, values))
        return len(diff_bytes(Diff(_ZERO, _ZERO, entries), options))

    lo, hi = 0, total
    while hi - lo > max(1, lo // 200):
        mid = (lo + hi + 1) // 2
        if encoded(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def hashed_layout(
    base: Model,
    names: Sequence[str],
    budget_bytes: int,
    value_format: ValueFormat = ValueFormat.F16,
    seed: int = 0,
    options: EncodeOptions = DEFAULT_OPTIONS,
) -> dict[str, int]:
    """Buckets per tensor (shares of size) such that a hashed diff of ``names`` fits.

    Sized with incompressible values, so trained bucket values of the same format fit.
    """
    sizes = np.array([base[n].array.size for n in names], dtype=np.float64)
    value_bytes = value_format.bits_per_value / 8
    available = budget_bytes - 64 - ENTRY_OVERHEAD_BYTES * len(names)
    total = max(int(available / value_bytes), len(names))
    rng = np.random.default_rng(0)

    def layout(total: int) -> dict[str, int]:
        shares = np.maximum(1, np.floor(sizes / max(sizes.sum(), 1) * total)).astype(np.int64)
        return {
            name: int(min(share, base[name].array.size))
            for name, share in zip(names, shares, strict=True)
        }

    def encoded(counts: dict[str, int]) -> int:
        entries: list[Entry] = [
            HashedEntry(
                name,
                base[name].dtype,
                base[name].shape,
                seed,
                Values.quantize(rng.standard_normal(count) * 1e-3, value_format),
            )
            for name, count in counts.items()
        ]
        return len(diff_bytes(Diff(_ZERO, _ZERO, entries), options))

    counts = layout(total)
    size = encoded(counts)
    while size > budget_bytes and total > len(names):
        total = max(len(names), int(total * min(0.98, budget_bytes / size)))
        counts = layout(total)
        size = encoded(counts)
    return counts


def diff_from_entries(base: Model, entries: Sequence[Entry], info: Mapping[str, Any]) -> Diff:
    """A diff of ``entries`` against ``base``; its target digest is computed by applying it."""
    base_digest = model_digest(base)
    result = _apply_unchecked(base, Diff(base_digest, _ZERO, list(entries)))
    return Diff(base_digest, model_digest(result), list(entries), dict(info))


def make_hashed(
    base: Model,
    target: Model,
    budget_bytes: int,
    value_format: ValueFormat = ValueFormat.F16,
    seed: int = 0,
    options: EncodeOptions = DEFAULT_OPTIONS,
) -> tuple[Diff, ApproxReport]:
    """Hashed approximation: per tensor, the least-squares bucket values of its delta."""
    names = [n for n in _float_pairs(base, target) if np.any(_delta(base[n], target[n]))]
    fixed = _exact_rest(base, target, set(_float_pairs(base, target)))
    fixed_bytes = len(diff_bytes(Diff(_ZERO, _ZERO, fixed), options)) if fixed else 0
    sizes = np.array([base[n].array.size for n in names], dtype=np.float64)
    changed = int(sum(np.count_nonzero(_delta(base[n], target[n])) for n in names))
    value_bytes = value_format.bits_per_value / 8
    available = budget_bytes - fixed_bytes - 64 - ENTRY_OVERHEAD_BYTES * len(names)
    total_buckets = max(int(available / value_bytes), len(names))

    def build(total: int) -> Diff:
        shares = np.maximum(1, np.floor(sizes / max(sizes.sum(), 1) * total)).astype(np.int64)
        entries: list[Entry] = list(fixed)
        for name, share in zip(names, shares, strict=True):
            buckets = int(min(share, base[name].array.size))
            values = _fit_buckets(_delta(base[name], target[name]), seed, buckets)
            entries.append(
                HashedEntry(
                    name,
                    base[name].dtype,
                    base[name].shape,
                    seed,
                    Values.quantize(values, value_format),
                )
            )
        return Diff(_ZERO, _ZERO, entries, {"method": "hashed", "budget_bytes": budget_bytes})

    diff = build(total_buckets)
    size = len(diff_bytes(diff, options))
    while size > budget_bytes and total_buckets > len(names):
        total_buckets = max(len(names), int(total_buckets * min(0.98, budget_bytes / size)))
        diff = build(total_buckets)
        size = len(diff_bytes(diff, options))
    # The buckets really sent: a tensor never gets more buckets than it has elements.
    kept = sum(len(e.buckets) for e in diff.entries if isinstance(e, HashedEntry))
    return _finish(base, target, diff, "hashed", budget_bytes, kept, changed, names, options)


def _fit_buckets(
    delta: npt.NDArray[np.float64], seed: int, buckets: int
) -> npt.NDArray[np.float64]:
    """Least-squares bucket values: the mean of ``sign * delta`` over each bucket."""
    sums = np.zeros(buckets)
    counts = np.zeros(buckets)
    for start in range(0, delta.size, CHUNK):
        stop = min(start + CHUNK, delta.size)
        bucket, negative = bucket_and_sign(seed, start, stop, buckets)
        signed = np.where(negative, -delta[start:stop], delta[start:stop])
        sums += np.bincount(bucket, weights=signed, minlength=buckets)
        counts += np.bincount(bucket, minlength=buckets)
    return np.divide(sums, counts, out=np.zeros(buckets), where=counts > 0)


_ZERO = "sha256:" + "0" * 64


def _exact_rest(base: Model, target: Model, approximable: set[str]) -> list[Entry]:
    entries = []
    for name in sorted(set(base) | set(target), key=sort_key):
        if name not in approximable:
            entry = exact_entry(name, base.get(name), target.get(name))
            if entry is not None:
                entries.append(entry)
    return entries


def _kth_largest(scores: npt.NDArray[Any], k: int) -> float:
    if k <= 0 or scores.size == 0:
        return float("inf")
    k = min(k, scores.size)
    return float(np.partition(scores, scores.size - k)[scores.size - k])


def _finish(
    base: Model,
    target: Model,
    draft: Diff,
    method: str,
    budget: int,
    kept: int,
    changed: int,
    names: list[str],
    options: EncodeOptions,
) -> tuple[Diff, ApproxReport]:
    diff = diff_from_entries(base, draft.entries, draft.info)
    result = _apply_unchecked(base, diff)
    num = den = 0.0
    worst = 0.0
    for name in names:
        err = _delta(result[name], target[name])
        full = _delta(base[name], target[name])
        num += float(err @ err)
        den += float(full @ full)
        if err.size:
            worst = max(worst, float(np.max(np.abs(err))))
    rel = (num / den) ** 0.5 if den > 0 else 0.0
    final_size = len(diff_bytes(diff, options))
    return diff, ApproxReport(method, budget, final_size, kept, changed, rel, worst)


def _apply_unchecked(base: Model, diff: Diff) -> dict[str, Tensor]:
    """Apply ``diff`` without a target check (the target digest is what we compute)."""
    result = dict(base)
    for entry in diff.entries:
        after = apply_entry(result.get(entry.name), entry)
        if after is None:
            result.pop(entry.name, None)
        else:
            result[entry.name] = after
    return result
