"""Models as safetensors files: in-memory tensors, memory-mapped files, load and save.

A model is a mapping from tensor name to :class:`Tensor`. :class:`ModelFile` maps a
safetensors file into memory so that a tensor is a zero-copy view of the file; opened
writable, patching a view patches the file (this is how a diff is applied in place,
with memory that grows with the diff, not with the model).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from diffs.dtypes import DType
from diffs.errors import ModelFormatError
from diffs.fileio import atomic_output
from diffs.limits import DEFAULT_LIMITS, DecodeLimits
from diffs.safetensors_file import (
    SafetensorsHeader,
    TensorInfo,
    TensorLayout,
    parse_header,
    write_safetensors,
)

_MADV_POPULATE_WRITE = 23
"""Linux's ``MADV_POPULATE_WRITE`` (5.14+); Python 3.11's :mod:`mmap` does not name it."""

_NUMPY_TO_DTYPE = {
    np.dtype(np.float64): DType.F64,
    np.dtype(np.float32): DType.F32,
    np.dtype(np.float16): DType.F16,
    np.dtype(np.int64): DType.I64,
    np.dtype(np.int32): DType.I32,
    np.dtype(np.int16): DType.I16,
    np.dtype(np.int8): DType.I8,
    np.dtype(np.uint64): DType.U64,
    np.dtype(np.uint32): DType.U32,
    np.dtype(np.uint16): DType.U16,
    np.dtype(np.uint8): DType.U8,
    np.dtype(np.bool_): DType.BOOL,
}


@dataclass(frozen=True)
class Tensor:
    """A tensor: its element type and a numpy array of that type's storage dtype."""

    dtype: DType
    array: npt.NDArray[Any]

    def __post_init__(self) -> None:
        # Exactly the storage dtype: a big-endian array would reach files and XORs as is.
        if self.array.dtype != self.dtype.storage:
            raise ModelFormatError(
                f"array of {self.array.dtype} cannot hold {self.dtype.value} elements"
            )

    @classmethod
    def of(cls, array: npt.ArrayLike, dtype: DType | None = None) -> Tensor:
        """Wrap a numpy array; ``dtype`` is needed only for BF16 (uint16 bit patterns)."""
        arr = np.asarray(array)
        if dtype is None:
            try:
                dtype = _NUMPY_TO_DTYPE[arr.dtype.newbyteorder("=")]
            except KeyError:
                raise ModelFormatError(f"unsupported numpy dtype {arr.dtype}") from None
        return cls(dtype, arr.astype(dtype.storage, copy=False))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.array.shape)

    @property
    def layout_bytes(self) -> bytes:
        return np.ascontiguousarray(self.array, dtype=self.dtype.storage).tobytes()


Model = Mapping[str, Tensor]


def array_bytes(array: npt.NDArray[Any]) -> memoryview:
    """The array's bytes, row-major, as a flat byte view (a copy only if not contiguous)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return memoryview(flat.view(np.uint8))  # type: ignore[arg-type]


class ModelFile(Mapping[str, Tensor]):
    """A safetensors model file mapped into memory; tensors are views of the mapping.

    Use as a context manager. With ``writable=True`` the file is mapped shared, and
    changes to a tensor view reach the file (call :meth:`flush` to make them durable).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        writable: bool = False,
        limits: DecodeLimits = DEFAULT_LIMITS,
    ) -> None:
        self.path = Path(path)
        self._handle: BinaryIO = open(self.path, "r+b" if writable else "rb")  # noqa: SIM115
        try:
            size = os.fstat(self._handle.fileno()).st_size
            self.header: SafetensorsHeader = parse_header(self._handle, size, limits)
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._map: mmap.mmap | None = (
                mmap.mmap(self._handle.fileno(), 0, access=access) if size > 0 else None
            )
        except BaseException:
            self._handle.close()
            raise
        self._writable = writable

    @property
    def infos(self) -> Mapping[str, TensorInfo]:
        return self.header.tensors

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def names(self) -> list[str]:
        return list(self.header.tensors)

    def tensor(self, name: str) -> Tensor:
        """A zero-copy view of tensor ``name`` (writable if the file was opened so)."""
        try:
            info = self.header.tensors[name]
        except KeyError:
            raise ModelFormatError(f"{self.path.name} has no tensor {name!r}") from None
        assert self._map is not None
        array: npt.NDArray[Any] = np.ndarray(
            shape=info.shape,
            dtype=info.dtype.storage,
            buffer=self._map,
            offset=info.begin,
        )
        if not self._writable:
            array.flags.writeable = False
        return Tensor(info.dtype, array)

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes as a read-only memoryview of the mapping."""
        info = self.header.tensors[name]
        assert self._map is not None
        return memoryview(self._map)[info.begin : info.end].toreadonly()

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.header.tensors:
            raise KeyError(name)
        return self.tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def __len__(self) -> int:
        return len(self.header.tensors)

    def prefault_for_write(self, name: str) -> None:
        """Map tensor ``name``'s pages writable now, in one system call (Linux 5.14+
        ``MADV_POPULATE_WRITE``), rather than by a page fault per page as a patch first
        writes each of them (several times dearer). Best effort: a no-op on a read-only
        file, or where the platform or kernel lacks it."""
        if self._writable:
            self._advise(name, _MADV_POPULATE_WRITE)

    def release(self, name: str) -> None:
        """Unmap tensor ``name``'s pages from this process (``MADV_DONTNEED``) when done
        with them, so that its resident memory does not grow with the model. The mapping
        is shared -- it *is* the file -- so the data, written changes included, stays in
        the file and the page cache, and a later access maps it again. Best effort."""
        self._advise(name, mmap.MADV_DONTNEED)

    def _advise(self, name: str, advice: int) -> None:
        # Only shared mappings (ACCESS_READ / ACCESS_WRITE, never ACCESS_COPY) may drop
        # pages this way; only Linux is known to keep dirty shared pages on MADV_DONTNEED.
        if self._map is None or not sys.platform.startswith("linux"):
            return
        info = self.header.tensors[name]
        start = info.begin - info.begin % mmap.PAGESIZE
        if info.end > start:
            with contextlib.suppress(OSError, ValueError):
                self._map.madvise(advice, start, info.end - start)

    def flush(self) -> None:
        if self._map is not None and self._writable:
            self._map.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._map is not None:
            # A tensor view still alive keeps the mapping open until it goes.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        self._handle.close()

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def load_model(
    path: str | os.PathLike[str], limits: DecodeLimits = DEFAULT_LIMITS
) -> dict[str, Tensor]:
    """Read a whole safetensors model into memory (copies out of the file)."""
    with ModelFile(path, limits=limits) as mf:
        return {name: Tensor(t.dtype, t.array.copy()) for name, t in mf.items()}


def save_model(
    path: str | os.PathLike[str], model: Model, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``model`` atomically as a canonical safetensors file."""
    layouts = [TensorLayout(name, t.dtype, t.shape) for name, t in model.items()]

    def write_data(layout: TensorLayout, out: BinaryIO) -> None:
        out.write(array_bytes(model[layout.name].array))

    with atomic_output(path) as out:
        write_safetensors(out, layouts, write_data, metadata)
