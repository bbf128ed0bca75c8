"""The canonical model digest: what proves a device holds exactly the published model.

Definition (version 1). SHA-256 over, in order:

- the 20 bytes ``b"diffcast-model-v1\\x00\\x00\\x00"``;
- the tensor count as u64 LE;
- for each tensor, in ascending order of the UTF-8 bytes of its name:
  u32 LE name length, the UTF-8 name; u8 dtype-name length, the ASCII dtype name
  (safetensors spelling, e.g. ``BF16``); u8 ndim, each dimension as u64 LE;
  u64 LE byte length, then the element bytes (little-endian, row-major).

The digest depends only on names, dtypes, shapes and bytes -- not on file layout,
metadata or tensor order in the file -- and is written ``sha256:<64 hex digits>``.
It is computed streaming: one tensor at a time, from memory-mapped views, so no second
copy of the model is ever made.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from diffs.dtypes import DType
from diffs.errors import DiffFormatError
from diffs.limits import DEFAULT_LIMITS, DecodeLimits
from diffs.model import Model, ModelFile, array_bytes
from diffs.safetensors_file import sort_key

DIGEST_PREFIX = "sha256:"
_MAGIC = b"diffcast-model-v1\x00\x00\x00"
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_CHUNK = 1 << 24


class ModelHasher:
    """Feeds tensors (in canonical order) into the canonical digest."""

    def __init__(self, tensor_count: int) -> None:
        self._hash = hashlib.sha256(_MAGIC + struct.pack("<Q", tensor_count))
        self._remaining = tensor_count
        self._last: bytes | None = None

    def add(self, name: str, dtype: DType, shape: tuple[int, ...], data: memoryview) -> None:
        key = sort_key(name)
        if self._last is not None and key <= self._last:
            raise ValueError(f"tensor {name!r} out of canonical order")
        self._last = key
        self._remaining -= 1
        dtype_name = dtype.value.encode("ascii")
        head = struct.pack("<I", len(key)) + key
        head += struct.pack("<B", len(dtype_name)) + dtype_name
        head += struct.pack("<B", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        head += struct.pack("<Q", data.nbytes)
        self._hash.update(head)
        for start in range(0, data.nbytes, _CHUNK):
            self._hash.update(data[start : start + _CHUNK])

    def add_array(self, name: str, dtype: DType, array: npt.NDArray[Any]) -> None:
        data = array_bytes(np.asarray(array, dtype=dtype.storage))
        self.add(name, dtype, tuple(int(d) for d in array.shape), data)

    def hexdigest(self) -> str:
        if self._remaining != 0:
            raise ValueError("digest finished before every tensor was added")
        return DIGEST_PREFIX + self._hash.hexdigest()


def model_digest(model: Model) -> str:
    """Canonical digest of an in-memory model."""
    hasher = ModelHasher(len(model))
    for name in sorted(model, key=sort_key):
        tensor = model[name]
        hasher.add_array(name, tensor.dtype, tensor.array)
    return hasher.hexdigest()


def file_digest(path: str | os.PathLike[str], limits: DecodeLimits = DEFAULT_LIMITS) -> str:
    """Canonical digest of a safetensors model file, streamed from a memory map."""
    with ModelFile(path, limits=limits) as mf:
        return model_file_digest(mf)


def model_file_digest(mf: ModelFile, *, release: bool = False) -> str:
    """Canonical digest of an open model file; ``release`` unmaps each tensor's pages once
    hashed (:meth:`ModelFile.release`), so resident memory stays near one tensor."""
    hasher = ModelHasher(len(mf.infos))
    for name, info in mf.infos.items():
        hasher.add(name, info.dtype, info.shape, mf.raw(name))
        if release:
            mf.release(name)
    return hasher.hexdigest()


def check_digest(value: object, what: str = "digest") -> str:
    """Return ``value`` if it is a well-formed digest, else raise :class:`DiffFormatError`."""
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise DiffFormatError(f"{what} {value!r} is not of the form sha256:<64 hex digits>")
    return value


def ordered(names: Iterable[str]) -> list[str]:
    return sorted(names, key=sort_key)
