"""Value arrays of a diff: their number formats and their byte coding.

Formats (how one delta is stored):

=========  =====================================================================
``f32``    IEEE binary32, little-endian
``f16``    IEEE binary16, little-endian; widened to binary32 exactly
``bf16``   bfloat16 bit patterns (u16 LE); widened to binary32 exactly
``i8``     signed bytes ``q`` with one binary32 ``scale`` per array; the delta is the
           binary32 product ``float32(q) * scale``, rounded to nearest even
``bits``   unsigned integers as wide as the tensor's dtype, XORed into its bit patterns
=========  =====================================================================

Codecs (how the array's bytes are stored in its section):

``raw``       the little-endian bytes as they are
``zstd``      a single Zstandard frame of the raw bytes
``shuffle``   the bytes transposed so that byte ``j`` of every element comes together
              (all first bytes, then all second bytes, ...), then one Zstandard frame;
              this is what makes the nearly-constant high bytes of float deltas and
              XOR patterns compress
``planes``    the same byte planes, but those that do not compress (the low mantissa
              bytes of XOR patterns and deltas look random) are stored as they are and
              only the others go into the Zstandard frame: one mask byte, the raw planes,
              then the frame. Smaller than ``shuffle`` (one entropy coder per kind of
              plane, not one for all) and faster to decode (raw planes cost a copy)

Decoding knows the exact decoded length from the element count before touching the
data, reads at most that many bytes out of a Zstandard frame (so a zip bomb costs
nothing), and fails if the frame holds more or fewer.
"""

from __future__ import annotations

import enum
import functools
import io
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import zstandard

from diffs.dtypes import DType, bf16_to_f32, f32_to_bf16
from diffs.errors import DiffFormatError


class ValueFormat(enum.Enum):
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    I8 = "i8"

    @property
    def storage(self) -> np.dtype[Any]:
        return _VALUE_STORAGE[self]

    @property
    def bits_per_value(self) -> int:
        return 8 * int(self.storage.itemsize)


_VALUE_STORAGE: dict[ValueFormat, np.dtype[Any]] = {
    ValueFormat.F32: np.dtype("<f4"),
    ValueFormat.F16: np.dtype("<f2"),
    ValueFormat.BF16: np.dtype("<u2"),
    ValueFormat.I8: np.dtype("i1"),
}


class Codec(enum.Enum):
    RAW = "raw"
    ZSTD = "zstd"
    SHUFFLE = "shuffle"
    PLANES = "planes"


PLANAR_CODECS = (Codec.SHUFFLE, Codec.PLANES)
"""Codecs whose bytes decode to byte planes (all first bytes, then all second bytes, ...),
not to whole elements."""


@dataclass(frozen=True)
class Values:
    """Deltas in one :class:`ValueFormat` (``scale`` only for ``i8``)."""

    format: ValueFormat
    data: npt.NDArray[Any]
    scale: float | None = None

    @classmethod
    def quantize(cls, deltas: npt.NDArray[Any], fmt: ValueFormat) -> Values:
        """Round float deltas into ``fmt`` (nearest, ties to even)."""
        d32 = np.asarray(deltas, dtype=np.float32)
        if fmt is ValueFormat.F32:
            return cls(fmt, d32.astype("<f4"))
        if fmt is ValueFormat.F16:
            return cls(fmt, d32.astype("<f2"))
        if fmt is ValueFormat.BF16:
            return cls(fmt, f32_to_bf16(d32))
        peak = float(np.max(np.abs(d32))) if d32.size else 0.0
        scale = float(np.float32(peak / 127.0)) if peak > 0 and np.isfinite(peak) else 1.0
        q = np.clip(np.rint(d32 / np.float32(scale)), -127, 127).astype(np.int8)
        return cls(fmt, q, scale)

    def widened(self) -> npt.NDArray[np.float32]:
        """The deltas as binary32, exactly as the format defines them."""
        if self.format is ValueFormat.F32:
            return self.data.astype(np.float32, copy=False)
        if self.format is ValueFormat.F16:
            return self.data.astype(np.float32)
        if self.format is ValueFormat.BF16:
            return bf16_to_f32(self.data)
        assert self.scale is not None
        return self.data.astype(np.float32) * np.float32(self.scale)

    def __len__(self) -> int:
        return int(self.data.size)


def float_format_of(dtype: DType) -> ValueFormat:
    """The value format that holds a tensor dtype's deltas without widening."""
    return {DType.F16: ValueFormat.F16, DType.BF16: ValueFormat.BF16}.get(dtype, ValueFormat.F32)


def encode_array(array: npt.NDArray[Any], codec: Codec, level: int) -> bytes:
    """The bytes of ``array`` (little-endian, flat) under ``codec``."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if codec is Codec.RAW:
        return flat.tobytes()
    if codec is Codec.PLANES:
        return _encode_planes(_byte_planes(flat), level)
    raw = _byte_planes(flat).tobytes() if codec is Codec.SHUFFLE else flat.tobytes()
    return zstandard.ZstdCompressor(level=level).compress(raw)


def _byte_planes(flat: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """``(width, count)``: row ``j`` holds byte ``j`` (little-endian) of every element."""
    width = flat.dtype.itemsize
    planes: npt.NDArray[np.uint8] = flat.view(np.uint8).reshape(-1, width).T
    return planes


PLANE_MIN_SAVING = 1 / 32
"""A byte plane goes into the ``planes`` codec's frame only if compressing it alone saves
at least this share of it; otherwise it is stored raw (decoding it then costs a copy)."""
_PLANE_PROBE_LEVEL = 3


def _encode_planes(planes: npt.NDArray[np.uint8], level: int) -> bytes:
    width, count = planes.shape
    probe = zstandard.ZstdCompressor(level=min(level, _PLANE_PROBE_LEVEL))
    limit = count * (1 - PLANE_MIN_SAVING)
    raw = [j for j in range(width) if len(probe.compress(planes[j].tobytes())) > limit]
    packed = [j for j in range(width) if j not in raw]
    mask = sum(1 << j for j in raw)
    frame = (
        zstandard.ZstdCompressor(level=level).compress(planes[packed].tobytes()) if packed else b""
    )
    return bytes([mask]) + planes[raw].tobytes() + frame


def best_encoding(array: npt.NDArray[Any], level: int) -> tuple[Codec, bytes]:
    """The smallest of the codecs for ``array`` (raw wins ties: it decodes fastest)."""
    best = (Codec.RAW, encode_array(array, Codec.RAW, level))
    candidates = (
        [Codec.ZSTD, Codec.PLANES, Codec.SHUFFLE] if array.dtype.itemsize > 1 else [Codec.ZSTD]
    )
    for codec in candidates:
        data = encode_array(array, codec, level)
        if len(data) < len(best[1]):
            best = (codec, data)
    return best


def decode_array(
    section: bytes | memoryview, codec: Codec, dtype: np.dtype[Any], count: int
) -> npt.NDArray[Any]:
    """Decode ``count`` elements of ``dtype``; the caller has capped ``count`` already."""
    raw = array_bytes(section, codec, count, dtype.itemsize)
    if codec in PLANAR_CODECS:
        return _unshuffle(np.frombuffer(raw, dtype=np.uint8), dtype, count)
    return np.frombuffer(raw, dtype=dtype, count=count)


def array_bytes(
    section: bytes | memoryview, codec: Codec, count: int, width: int
) -> bytes | memoryview | bytearray:
    """The ``count * width`` bytes a section of ``count`` elements of ``width`` bytes
    holds, decompressed but, for ``shuffle`` and ``planes``, still as byte planes."""
    parts = array_parts(section, codec, count, width)
    if parts.mask <= 0:  # interleaved, or every plane in one buffer
        return parts.packed if parts.mask == 0 else parts.raw
    if not parts.packed:  # every plane raw, in order
        return parts.raw
    out = bytearray(width * count)
    raw, packed = _plane_split(parts.mask, width)
    with memoryview(parts.raw) as raw_planes, memoryview(parts.packed) as packed_planes:
        for planes, order in ((raw_planes, raw), (packed_planes, packed)):
            for i, j in enumerate(order):
                out[j * count : (j + 1) * count] = planes[i * count : (i + 1) * count]
    return out


class ArrayParts(NamedTuple):
    """A section's bytes, decompressed, in the layout they are stored in. ``mask`` -1:
    whole elements, in ``raw``. Else byte planes: plane ``j`` is the next plane of ``raw``
    where bit ``j`` of ``mask`` is set, else the next plane of ``packed``."""

    mask: int
    raw: bytes | memoryview | bytearray
    packed: bytes | memoryview | bytearray


def array_parts(section: bytes | memoryview, codec: Codec, count: int, width: int) -> ArrayParts:
    """The parts of a section of ``count`` elements of ``width`` bytes (what the compiled
    kernel applies, with no copy to put the planes in order). Every length is checked."""
    expected = count * width
    if codec is Codec.RAW:
        if len(section) != expected:
            raise DiffFormatError(f"raw array is {len(section)} bytes, expected {expected}")
        return ArrayParts(-1, section, b"")
    if codec is not Codec.PLANES:
        data = _bounded_decompress(section, expected)
        return ArrayParts(0, b"", data) if codec is Codec.SHUFFLE else ArrayParts(-1, data, b"")
    buf = memoryview(section).cast("B")
    if len(buf) < 1:
        raise DiffFormatError("planes section is empty")
    mask = buf[0]
    if mask >> width:
        raise DiffFormatError(f"plane mask {mask:#04x} names planes a {width}-byte element lacks")
    raw, packed = _plane_split(mask, width)
    raw_end = 1 + len(raw) * count
    if len(buf) < raw_end:
        raise DiffFormatError(f"planes section is {len(buf)} bytes, its raw planes need {raw_end}")
    if packed:
        data = _bounded_decompress(buf[raw_end:], len(packed) * count)
    elif len(buf) != raw_end:
        raise DiffFormatError(f"planes section has {len(buf) - raw_end} bytes after its planes")
    else:
        data = b""
    return ArrayParts(mask, buf[1:raw_end], data)


@functools.cache
def _plane_split(mask: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The planes a ``planes`` mask stores raw, and those in its frame, in order."""
    raw = tuple(j for j in range(width) if mask >> j & 1)
    return raw, tuple(j for j in range(width) if j not in raw)


def _unshuffle(planes: npt.NDArray[np.uint8], dtype: np.dtype[Any], count: int) -> npt.NDArray[Any]:
    """Interleave byte planes back into elements: element ``i`` is ``planes[j][i]`` for
    ``j = 0..width-1``, little-endian. Built with whole-array shifts and ORs on a
    ``<u{width}`` array (a strided byte transpose is several times slower)."""
    width = dtype.itemsize
    if width == 1:
        return planes.view(dtype)
    rows = planes.reshape(width, count)
    out: npt.NDArray[Any] = rows[width - 1].astype(np.dtype(f"<u{width}"))
    for j in range(width - 2, -1, -1):
        out <<= 8
        out |= rows[j]
    result: npt.NDArray[Any] = out.view(dtype)
    return result


_READ_CHUNK = 1 << 24
"""Most bytes asked of the decompressor at once: ``read(n)`` allocates ``n`` bytes up front,
so memory follows what the frame really holds, not what the manifest declares."""


_REUSE_WINDOW = 1 << 24
_thread = threading.local()


def _decompressor(
    section: bytes | memoryview, window: int | None = None
) -> zstandard.ZstdDecompressor:
    """A decompressor for one frame: this thread's own, reused, when the frame's window is
    at most ``_REUSE_WINDOW`` (setting one up costs several microseconds per array); a
    fresh one otherwise, so that no thread keeps a large window buffer alive. An instance
    must never serve two threads at once, hence one per thread. ``window``: the frame's
    window size where the caller has read its header already."""
    if window is None:
        try:
            window = zstandard.get_frame_parameters(section).window_size
        except zstandard.ZstdError:  # not a frame header: the reader will say what is wrong
            window = _REUSE_WINDOW + 1
    if window > _REUSE_WINDOW:
        return zstandard.ZstdDecompressor()
    dctx: zstandard.ZstdDecompressor | None = getattr(_thread, "dctx", None)
    if dctx is None:
        dctx = _thread.dctx = zstandard.ZstdDecompressor()
    return dctx


def _decompress_into(section: bytes | memoryview, expected: int) -> bytearray:
    """One frame straight into one buffer; it must hold exactly ``expected`` bytes.

    The buffer has room for one byte more, asked for in the same reads, which is how a
    frame that holds more shows itself (a read after the buffer is full can miss it).
    """
    _check_one_frame(section)
    data = bytearray(expected + 1)
    filled = 0
    try:
        reader = _decompressor(section).stream_reader(section, read_across_frames=False)
        with reader, memoryview(data) as view:
            while filled <= expected:
                got = reader.readinto(view[filled:])
                if not got:
                    break
                filled += got
    except zstandard.ZstdError as exc:
        raise DiffFormatError(f"corrupt Zstandard frame: {exc}") from None
    if filled != expected:
        raise DiffFormatError(f"compressed array holds {filled}+ bytes, expected {expected}")
    del data[expected:]
    return data


_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
_RLE_BLOCK, _RESERVED_BLOCK = 1, 3


def _check_one_frame(section: bytes | memoryview) -> None:
    """Check that ``section`` is one Zstandard frame and nothing more, by its block
    headers (RFC 8878, 3.1.1.2), before a streaming read, which stops at the end of the
    frame and would never see what follows it."""
    buf = memoryview(section).cast("B")
    try:
        at = zstandard.frame_header_size(buf)
        checksum = zstandard.get_frame_parameters(buf).has_checksum
    except zstandard.ZstdError as exc:
        raise DiffFormatError(f"corrupt Zstandard frame: {exc}") from None
    if buf[:4] != _FRAME_MAGIC:
        raise DiffFormatError("a compressed section must be one Zstandard frame")
    last = False
    while not last:
        if at + 3 > len(buf):
            raise DiffFormatError("Zstandard frame is truncated")
        header = buf[at] | buf[at + 1] << 8 | buf[at + 2] << 16
        last, kind, size = bool(header & 1), header >> 1 & 3, header >> 3
        if kind == _RESERVED_BLOCK:
            raise DiffFormatError("corrupt Zstandard frame: reserved block type")
        at += 3 + (1 if kind == _RLE_BLOCK else size)
    end = at + 4 * checksum
    if end != len(buf):
        how = "is truncated" if end > len(buf) else f"is followed by {len(buf) - end} bytes"
        raise DiffFormatError(f"Zstandard frame {how}")


def _whole_frame(section: bytes | memoryview, expected: int) -> bytes | None:
    """A frame whose header declares its size, decoded in one call (the fastest way):
    ``None`` when the header declares none (then the frame is read into a buffer, which
    finds out what it really holds). A declared size other than ``expected`` is refused
    before anything is allocated; zstd itself checks that the frame holds what it
    declares."""
    try:
        header = zstandard.get_frame_parameters(section)
    except zstandard.ZstdError:  # not a frame header: the reader will say what is wrong
        return None
    declared = header.content_size
    if declared == zstandard.CONTENTSIZE_UNKNOWN:
        return None
    if declared != expected:
        raise DiffFormatError(f"compressed array declares {declared} bytes, expected {expected}")
    try:
        data: bytes = _decompressor(section, header.window_size).decompress(
            section, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise DiffFormatError(f"corrupt Zstandard frame: {exc}") from None
    return data


def _bounded_decompress(section: bytes | memoryview, expected: int) -> bytes | bytearray:
    """Decompress one Zstandard frame that must hold exactly ``expected`` bytes.

    Below ``_READ_CHUNK`` bytes, the frame is decoded in one call when its header declares
    its size (:func:`_whole_frame`), else straight into one buffer (no intermediate
    chunks, no copies); larger arrays are read a chunk at a time. Either way at most
    ``_READ_CHUNK`` bytes are allocated before the frame shows it holds them.
    """
    if expected < _READ_CHUNK:
        whole = _whole_frame(section, expected)
        return whole if whole is not None else _decompress_into(section, expected)
    _check_one_frame(section)
    data = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(section), read_across_frames=False
        )
        with reader:
            while len(data) <= expected:
                chunk = reader.read(min(expected + 1 - len(data), _READ_CHUNK))
                if not chunk:
                    break
                data += chunk
    except zstandard.ZstdError as exc:
        raise DiffFormatError(f"corrupt Zstandard frame: {exc}") from None
    if len(data) != expected:
        raise DiffFormatError(f"compressed array holds {len(data)}+ bytes, expected {expected}")
    return data
