"""Reading and writing the safetensors container, with every size checked first.

Format (https://github.com/huggingface/safetensors): an unsigned 64-bit little-endian
header length ``n``; ``n`` bytes of UTF-8 JSON mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional ``__metadata__``
string-to-string map; then the byte buffer. Offsets are relative to the buffer, and the
tensors must tile it exactly (no gap, no overlap, nothing after the last one).

Invariants of :func:`parse_header`: it reads at most ``8 + max_header_bytes`` bytes, and
rejects (with :class:`ModelFormatError`, or :class:`LimitExceededError` for caps) any header
whose sizes disagree with the dtype and shape, or with the file's actual length.

:func:`write_safetensors` writes a canonical layout: tensors sorted by name (UTF-8 bytes),
JSON with sorted keys and no spaces, header padded with spaces to a multiple of 8 bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from diffs.dtypes import DType
from diffs.errors import LimitExceededError, ModelFormatError
from diffs.limits import DEFAULT_LIMITS, DecodeLimits

METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int
    """Absolute file offset of the first byte."""
    end: int
    """Absolute file offset one past the last byte."""

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return numel(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    """Tensor infos keyed by name, in canonical (sorted) order."""
    data_start: int


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def sort_key(name: str) -> bytes:
    """The canonical order of tensor names: by their UTF-8 bytes."""
    return name.encode("utf-8")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ModelFormatError(f"duplicate key {key!r} in safetensors header")
        result[key] = value
    return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header(
    handle: BinaryIO, file_size: int, limits: DecodeLimits = DEFAULT_LIMITS
) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file of ``file_size`` bytes."""
    if file_size < 8:
        raise ModelFormatError(f"file is {file_size} bytes, too short for a safetensors header")
    handle.seek(0)
    (header_len,) = struct.unpack("<Q", handle.read(8))
    if header_len > limits.max_header_bytes:
        raise LimitExceededError(
            f"header declares {header_len} bytes, above the cap of {limits.max_header_bytes}"
        )
    if header_len > file_size - 8:
        raise ModelFormatError(
            f"header declares {header_len} bytes but the file has only {file_size - 8} after it"
        )
    raw = handle.read(header_len)
    if len(raw) != header_len:
        raise ModelFormatError("file ended inside the header")
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError) as exc:  # ValueError: also ints of > 4300 digits
        raise ModelFormatError(f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ModelFormatError("header is not a JSON object")
    data_start = 8 + header_len
    return _validate_header(parsed, data_start, file_size - data_start, limits)


def _validate_header(
    parsed: dict[str, Any], data_start: int, buffer_len: int, limits: DecodeLimits
) -> SafetensorsHeader:
    metadata_raw = parsed.pop(METADATA_KEY, {})
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _is_utf8(k) and _is_utf8(v)
        for k, v in metadata_raw.items()
    ):
        raise ModelFormatError("__metadata__ must map strings to strings")
    if len(parsed) > limits.max_tensors:
        raise LimitExceededError(
            f"file declares {len(parsed)} tensors, above the cap of {limits.max_tensors}"
        )
    infos = [_validate_tensor(name, spec, data_start, limits) for name, spec in parsed.items()]
    cursor = data_start
    for info in sorted(infos, key=lambda i: (i.begin, i.end)):
        if info.begin != cursor:
            raise ModelFormatError(
                f"tensor {info.name!r} starts at buffer offset {info.begin - data_start}, "
                f"expected {cursor - data_start}: offsets must tile the buffer"
            )
        cursor = info.end
    if cursor - data_start != buffer_len:
        raise ModelFormatError(
            f"tensors cover {cursor - data_start} bytes but the buffer has {buffer_len}"
        )
    ordered = {i.name: i for i in sorted(infos, key=lambda i: sort_key(i.name))}
    return SafetensorsHeader(dict(metadata_raw), ordered, data_start)


def _is_utf8(text: str) -> bool:
    """Whether ``text`` encodes to UTF-8 (JSON escapes can smuggle in lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _validate_tensor(name: str, spec: object, data_start: int, limits: DecodeLimits) -> TensorInfo:
    if not name or not _is_utf8(name):
        raise ModelFormatError(f"tensor name {name!r} is empty or not valid UTF-8")
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise ModelFormatError(f"tensor {name!r}: expected keys dtype, shape, data_offsets")
    dtype = DType.parse(spec["dtype"])
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ModelFormatError(f"tensor {name!r}: shape must be a list of non-negative integers")
    if len(shape) > limits.max_ndim:
        raise LimitExceededError(f"tensor {name!r} has {len(shape)} dimensions")
    if any(d > limits.max_tensor_elements for d in shape):  # [0, 2**70] has 0 elements
        raise LimitExceededError(f"tensor {name!r} has a dimension above the element cap")
    count = numel(tuple(shape))
    if count > limits.max_tensor_elements:
        raise LimitExceededError(f"tensor {name!r} declares {count} elements")
    offsets = spec["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise ModelFormatError(f"tensor {name!r}: data_offsets must be two non-negative integers")
    begin, end = offsets
    if end < begin or end - begin != count * dtype.itemsize:
        raise ModelFormatError(
            f"tensor {name!r}: {end - begin} bytes do not hold {count} x {dtype.value}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


@dataclass(frozen=True)
class TensorLayout:
    """A tensor to be written: its name, dtype, shape."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize


def encode_header(layouts: Iterable[TensorLayout], metadata: Mapping[str, str]) -> bytes:
    """The canonical header (length prefix included) for ``layouts`` in name order."""
    entries: dict[str, Any] = {}
    offset = 0
    for layout in sorted(layouts, key=lambda t: sort_key(t.name)):
        if layout.name == METADATA_KEY or layout.name in entries:
            raise ModelFormatError(f"invalid or repeated tensor name {layout.name!r}")
        try:
            layout.name.encode("utf-8")
        except UnicodeEncodeError:
            raise ModelFormatError(f"tensor name {layout.name!r} is not valid Unicode") from None
        entries[layout.name] = {
            "dtype": layout.dtype.value,
            "shape": list(layout.shape),
            "data_offsets": [offset, offset + layout.nbytes],
        }
        offset += layout.nbytes
    if metadata:
        entries[METADATA_KEY] = dict(metadata)
    body = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    raw = body.encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    out: BinaryIO,
    layouts: Iterable[TensorLayout],
    write_data: Callable[[TensorLayout, BinaryIO], None],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file, asking ``write_data`` for each tensor's bytes in turn.

    ``write_data`` must write exactly ``layout.nbytes`` bytes; this is checked, so a
    tensor can be streamed from anywhere without holding the whole model in memory.
    """
    ordered = sorted(layouts, key=lambda t: sort_key(t.name))
    out.write(encode_header(ordered, metadata or {}))
    for layout in ordered:
        start = out.tell()
        write_data(layout, out)
        written = out.tell() - start
        if written != layout.nbytes:
            raise ModelFormatError(
                f"tensor {layout.name!r}: wrote {written} bytes, expected {layout.nbytes}"
            )
