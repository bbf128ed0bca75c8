"""Tests of the ``diffs`` package, and the small model helpers they share."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from diffs.container import Diff
from diffs.dtypes import DType, f32_to_bf16, from_compute, to_compute
from diffs.entries import AddEntry, Entry, ExactEntry, HashedEntry, ReplaceEntry, SparseEntry
from diffs.model import Model, Tensor
from diffs.safetensors_file import sort_key
from diffs.values import Values

FLOAT_DTYPES = (DType.F32, DType.F16, DType.BF16, DType.F64)
ALL_DTYPES = tuple(DType)


def random_tensor(
    rng: np.random.Generator, dtype: DType, shape: tuple[int, ...], scale: float = 1.0
) -> Tensor:
    """Finite normal values for float dtypes, any value for integers, 0/1 for BOOL."""
    if dtype.is_float:
        values = (rng.standard_normal(shape) * scale).astype(np.float32)
        if dtype is DType.BF16:
            return Tensor(dtype, f32_to_bf16(values).reshape(shape))
        return Tensor(dtype, values.astype(dtype.storage))
    if dtype is DType.BOOL:
        return Tensor(dtype, rng.random(shape) < 0.5)
    info = np.iinfo(dtype.storage)
    return Tensor(
        dtype, rng.integers(info.min, info.max, shape, dtype=dtype.storage, endpoint=True)
    )


def random_bits_tensor(rng: np.random.Generator, dtype: DType, shape: tuple[int, ...]) -> Tensor:
    """Arbitrary bit patterns (NaNs, infinities, subnormals included); 0/1 for BOOL."""
    if dtype is DType.BOOL:
        return Tensor(dtype, rng.random(shape) < 0.5)
    count = int(np.prod(shape, dtype=np.int64))
    raw = rng.integers(0, 256, count * dtype.itemsize, dtype=np.uint8)
    return Tensor(dtype, raw.view(dtype.storage).reshape(shape))


def perturb(
    rng: np.random.Generator, tensor: Tensor, density: float, scale: float = 0.05
) -> Tensor:
    """A copy with about ``density`` of its elements changed (bits flipped for non-floats)."""
    flat = np.array(tensor.array, copy=True).reshape(-1)
    mask = rng.random(flat.size) < density
    if tensor.dtype.is_float:
        wide = to_compute(flat, tensor.dtype).copy()
        noise = rng.standard_normal(int(mask.sum())) * scale
        with np.errstate(invalid="ignore", over="ignore"):  # inf + x, near-max + x
            wide[mask] += noise.astype(wide.dtype)
        flat = from_compute(wide, tensor.dtype)
    elif tensor.dtype is DType.BOOL:
        flat[mask] = ~flat[mask]
    else:
        bits = flat.view(tensor.dtype.bits)
        bits[mask] ^= rng.integers(1, 256, int(mask.sum())).astype(tensor.dtype.bits)
    return Tensor(tensor.dtype, flat.reshape(tensor.shape))


def tensor_bytes(tensor: Tensor) -> bytes:
    return tensor.layout_bytes


def assert_same_model(actual: Model, expected: Model) -> None:
    """Same names, dtypes, shapes and bytes (bit for bit: NaN payloads, -0.0 included)."""
    assert sorted(actual) == sorted(expected)
    for name in expected:
        a, e = actual[name], expected[name]
        assert a.dtype is e.dtype, name
        assert a.shape == e.shape, name
        assert tensor_bytes(a) == tensor_bytes(e), name


def file_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def _bits(array: npt.NDArray[Any]) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def _same_values(got: Values, want: Values) -> None:
    assert got.format is want.format
    assert got.data.dtype == want.format.storage
    assert got.data.shape == (len(want),)
    assert _bits(got.data) == _bits(want.data)
    if want.scale is None:
        assert got.scale is None
    else:
        assert got.scale is not None
        assert struct.pack("<d", got.scale) == struct.pack("<d", want.scale)


def assert_same_entry(got: Entry, want: Entry) -> None:
    assert type(got) is type(want)
    assert got.name == want.name
    if isinstance(want, ReplaceEntry | AddEntry):
        assert isinstance(got, ReplaceEntry | AddEntry)
        assert got.tensor.dtype is want.tensor.dtype
        assert got.tensor.shape == want.tensor.shape
        assert got.tensor.array.dtype == want.tensor.dtype.storage
        assert got.tensor.layout_bytes == want.tensor.layout_bytes
        return
    assert not isinstance(got, ReplaceEntry | AddEntry)
    assert got.dtype is want.dtype
    assert got.shape == want.shape
    if isinstance(want, SparseEntry):
        assert isinstance(got, SparseEntry)
        assert got.positions.dtype == np.int64
        np.testing.assert_array_equal(got.positions, want.positions)
        _same_values(got.values, want.values)
    elif isinstance(want, HashedEntry):
        assert isinstance(got, HashedEntry)
        assert got.seed == want.seed
        _same_values(got.buckets, want.buckets)
    elif isinstance(want, ExactEntry):
        assert isinstance(got, ExactEntry)
        np.testing.assert_array_equal(got.positions, want.positions)
        assert got.xor.dtype == want.dtype.bits
        assert _bits(got.xor) == _bits(want.xor.astype(want.dtype.bits))


def assert_same_diff(got: Diff, want: Diff) -> None:
    assert got.base_digest == want.base_digest
    assert got.target_digest == want.target_digest
    assert got.info == want.info
    expected = sorted(want.entries, key=lambda e: sort_key(e.name))
    assert [e.name for e in got.entries] == [e.name for e in expected]
    for g, w in zip(got.entries, expected, strict=True):
        assert_same_entry(g, w)
