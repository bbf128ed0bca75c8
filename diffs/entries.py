"""Diff entries -- one change to one tensor -- and the exact arithmetic that applies them.

Kinds:

- :class:`SparseEntry`: ``w[p] <- w[p] + v`` at strictly increasing flat positions ``p``.
- :class:`HashedEntry`: ``w[i] <- w[i] + sign(i) * b[bucket(i)]`` at every position,
  with the map of :mod:`diffs.hashing`.
- :class:`ExactEntry`: ``bits(w[p]) <- bits(w[p]) XOR x`` -- lossless, any dtype.
- :class:`ReplaceEntry`: the tensor becomes the given one (any dtype and shape).
- :class:`AddEntry`: a tensor the base lacks. :class:`RemoveEntry`: a tensor goes.

The addition (sparse, hashed) is defined for float tensors only, and exactly: the stored
element and the delta are widened to the compute type (binary64 for F64, binary32 for
everything else -- exact for F16 and BF16), added in that type with IEEE 754
round-to-nearest-even, then rounded to the tensor's dtype (nearest, ties to even). The
hashed delta ``sign * b`` is a sign flip, so exact. Every machine gets the same bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from diffs.dtypes import DType, from_compute, to_compute
from diffs.errors import IncompatibleModelError
from diffs.hashing import CHUNK, bucket_and_sign
from diffs.kernels import native
from diffs.model import Tensor
from diffs.safetensors_file import numel
from diffs.values import Values


@dataclass(frozen=True)
class SparseEntry:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    positions: npt.NDArray[np.int64]
    values: Values
    kind = "sparse"


@dataclass(frozen=True)
class HashedEntry:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    seed: int
    buckets: Values
    kind = "hashed"


@dataclass(frozen=True)
class ExactEntry:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    positions: npt.NDArray[np.int64]
    xor: npt.NDArray[Any]
    """Bit patterns (unsigned, as wide as ``dtype``) XORed in at ``positions``."""
    kind = "exact"


@dataclass(frozen=True)
class ReplaceEntry:
    name: str
    tensor: Tensor
    kind = "replace"


@dataclass(frozen=True)
class AddEntry:
    name: str
    tensor: Tensor
    kind = "add"


@dataclass(frozen=True)
class RemoveEntry:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    kind = "remove"


Entry = SparseEntry | HashedEntry | ExactEntry | ReplaceEntry | AddEntry | RemoveEntry
InPlaceEntry = SparseEntry | HashedEntry | ExactEntry


def is_in_place(entry: Entry) -> bool:
    """Whether the entry keeps the tensor's name, dtype and shape (patchable in place)."""
    return isinstance(entry, SparseEntry | HashedEntry | ExactEntry)


class TensorChange(Protocol):
    """What names the tensor a change applies to: an in-place or remove entry, or the
    manifest's description of one."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> DType: ...
    @property
    def shape(self) -> tuple[int, ...]: ...


def check_fits(entry: TensorChange, tensor: Tensor | None) -> Tensor:
    """The tensor an in-place or remove entry applies to, checked against the entry."""
    if tensor is None:
        raise IncompatibleModelError(f"the model has no tensor {entry.name!r}")
    if tensor.dtype is not entry.dtype or tensor.shape != entry.shape:
        raise IncompatibleModelError(
            f"tensor {entry.name!r} is {tensor.dtype.value}{list(tensor.shape)}, "
            f"the diff expects {entry.dtype.value}{list(entry.shape)}"
        )
    return tensor


def patch_in_place(flat: npt.NDArray[Any], dtype: DType, entry: InPlaceEntry) -> None:
    """Apply an in-place entry to the flat storage array of a tensor, modifying it.

    Overflow to infinity is part of the defined arithmetic, so numpy is told not to warn.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        _patch(flat, dtype, entry)


def _patch(flat: npt.NDArray[Any], dtype: DType, entry: InPlaceEntry) -> None:
    if isinstance(entry, ExactEntry):
        bits = flat.view(dtype.bits)
        if native is not None and bits.flags.c_contiguous:
            xor = np.ascontiguousarray(entry.xor, dtype=dtype.bits)
            _scatter(native.xor_scatter, bits, entry.positions, xor)
        else:
            bits[entry.positions] ^= entry.xor
    elif isinstance(entry, SparseEntry):
        add_at(flat, dtype, entry.positions, entry.values.widened())
    else:
        table = entry.buckets.widened()
        k = len(table)
        for start in range(0, flat.size, CHUNK):
            stop = min(start + CHUNK, flat.size)
            bucket, negative = bucket_and_sign(entry.seed, start, stop, k)
            delta = table[bucket]
            np.negative(delta, out=delta, where=negative)
            block = flat[start:stop]
            block[...] = from_compute(
                to_compute(block, dtype) + delta.astype(_compute(dtype)), dtype
            )


def add_at(
    flat: npt.NDArray[Any], dtype: DType, positions: npt.NDArray[np.int64], delta: npt.NDArray[Any]
) -> None:
    """``flat[p] <- round(widen(flat[p]) + widen(delta))``, the defined sparse addition."""
    if native is not None and dtype is DType.F32 and flat.flags.c_contiguous:
        _scatter(native.add_scatter_f32, flat, positions, np.ascontiguousarray(delta, np.float32))
        return
    current = to_compute(np.take(flat, positions), dtype)
    current += delta.astype(_compute(dtype), copy=False)
    flat[positions] = from_compute(current, dtype)


def _scatter(
    kernel: Callable[..., None],
    target: npt.NDArray[Any],
    positions: npt.NDArray[np.int64],
    values: npt.NDArray[Any],
) -> None:
    """Run a compiled scatter; it checks positions (strictly increasing, in range) first
    and writes nothing when they are not."""
    pos = np.ascontiguousarray(positions, dtype=np.int64)
    if pos.shape != values.shape:
        raise IncompatibleModelError(f"{pos.size} positions but {values.size} values")
    try:
        kernel(target, pos, values, target.itemsize)
    except IndexError as exc:
        raise IncompatibleModelError(f"entry does not fit its tensor: {exc}") from None


def _compute(dtype: DType) -> type[np.floating[Any]]:
    return np.float64 if dtype is DType.F64 else np.float32


def apply_entry(current: Tensor | None, entry: Entry) -> Tensor | None:
    """The tensor after ``entry`` (``None``: the tensor is gone). Never modifies ``current``."""
    if isinstance(entry, AddEntry):
        if current is not None:
            raise IncompatibleModelError(f"the diff adds {entry.name!r}, which the model has")
        return entry.tensor
    if isinstance(entry, ReplaceEntry):
        if current is None:
            raise IncompatibleModelError(f"the diff replaces {entry.name!r}, which is missing")
        return entry.tensor
    if isinstance(entry, RemoveEntry):
        check_fits(entry, current)
        return None
    tensor = check_fits(entry, current)
    flat = np.array(tensor.array, copy=True).reshape(-1)
    patch_in_place(flat, tensor.dtype, entry)
    return Tensor(tensor.dtype, flat.reshape(tensor.shape))


def tensor_numel(entry: Entry) -> int:
    if isinstance(entry, ReplaceEntry | AddEntry):
        return numel(entry.tensor.shape)
    return numel(entry.shape)
