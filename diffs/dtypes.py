"""Tensor element types, their little-endian storage, and exact float conversions.

Names are those of the safetensors format. Every tensor is held as a numpy array of its
*storage* dtype: bfloat16 (which numpy lacks) is stored as ``<u2`` bit patterns and
converted to and from float32 with the exact rules below, so every machine computes the
same bits.

Invariants:
- ``bf16_to_f32`` is exact (it shifts the 16 bits into the high half of a float32).
- ``f32_to_bf16`` rounds to nearest, ties to even; NaN stays NaN (quiet bit set, sign
  kept); values past the largest bfloat16 round to infinity, as IEEE 754 requires.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import numpy.typing as npt

from diffs.errors import ModelFormatError


class DType(enum.Enum):
    """An element type, named as in safetensors."""

    F64 = "F64"
    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    I64 = "I64"
    I32 = "I32"
    I16 = "I16"
    I8 = "I8"
    U64 = "U64"
    U32 = "U32"
    U16 = "U16"
    U8 = "U8"
    BOOL = "BOOL"

    @classmethod
    def parse(cls, name: object) -> DType:
        """Return the dtype called ``name`` or raise :class:`ModelFormatError`."""
        try:
            return cls(name)
        except ValueError:
            raise ModelFormatError(f"unsupported dtype {name!r}") from None

    @property
    def storage(self) -> np.dtype[Any]:
        """The little-endian numpy dtype that holds this type's bytes."""
        return _STORAGE[self]

    @property
    def itemsize(self) -> int:
        return int(self.storage.itemsize)

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def bits(self) -> np.dtype[Any]:
        """The unsigned integer dtype with this type's width (for bit-pattern XOR)."""
        return _BITS[self.itemsize]


_BITS: dict[int, np.dtype[Any]] = {w: np.dtype(f"<u{w}") for w in (1, 2, 4, 8)}

_STORAGE: dict[DType, np.dtype[Any]] = {
    DType.F64: np.dtype("<f8"),
    DType.F32: np.dtype("<f4"),
    DType.F16: np.dtype("<f2"),
    DType.BF16: np.dtype("<u2"),
    DType.I64: np.dtype("<i8"),
    DType.I32: np.dtype("<i4"),
    DType.I16: np.dtype("<i2"),
    DType.I8: np.dtype("i1"),
    DType.U64: np.dtype("<u8"),
    DType.U32: np.dtype("<u4"),
    DType.U16: np.dtype("<u2"),
    DType.U8: np.dtype("u1"),
    DType.BOOL: np.dtype("?"),
}
_FLOATS = frozenset({DType.F64, DType.F32, DType.F16, DType.BF16})


def bf16_to_f32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """Widen bfloat16 bit patterns to float32 exactly."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """Round float32 values to bfloat16 bit patterns (nearest, ties to even)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = (bits + (np.uint32(0x7FFF) + lsb)) >> np.uint32(16)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16)


def to_compute(values: npt.NDArray[Any], dtype: DType) -> npt.NDArray[Any]:
    """Convert stored values of a float ``dtype`` to its compute type (float64 for F64,
    float32 otherwise), exactly."""
    if dtype is DType.BF16:
        return bf16_to_f32(values)
    if dtype is DType.F64:
        return values.astype(np.float64, copy=False)
    return values.astype(np.float32, copy=False)


def from_compute(values: npt.NDArray[Any], dtype: DType) -> npt.NDArray[Any]:
    """Round compute-type values to the storage of float ``dtype`` (nearest, ties to even)."""
    if dtype is DType.BF16:
        return f32_to_bf16(values)
    return values.astype(dtype.storage, copy=False)
