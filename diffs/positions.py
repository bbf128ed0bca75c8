"""Coding strictly increasing positions near the information-theoretic bound.

Choosing which ``k`` of ``N`` elements changed carries ``log2(C(N, k))`` bits of
information (:func:`position_bound_bits`); this module codes positions within about 1% of
that at densities 0.5%-10%, and decodes fully vectorized in numpy.

Section layout (all integers little-endian)::

    u8   mode            0 = RICE, 1 = ALL (k == N, nothing else follows)
    -- RICE only --
    u8   block_log2      gaps per block = 2**block_log2 (8..20)
    u64  unary_nbytes    length of the unary stream
    u8[ceil(k / B)]      Rice parameter r of each block (0..32)
    u8[unary_nbytes]     unary stream
    u8[...]              remainder stream, ceil(sum of r over all gaps / 8) bytes

Gaps are ``g[i] = p[i] - p[i-1] - 1`` with ``p[-1] = -1``. Gap ``g`` of a block with
parameter ``r`` is split into ``q = g >> r`` -- written to the unary stream as ``q`` zero
bits then a one bit -- and its low ``r`` bits, written to the remainder stream. Both
streams are bit-packed LSB-first (bit ``j`` of the stream is bit ``j % 8`` of byte
``j // 8``); pad bits are zero. Splitting the streams lets the decoder find every
quotient with one vectorized scan for set bits and every remainder with one gather.

Decoding runs the compiled kernel of :mod:`diffs.kernels` where it was built (it reads
the header too), else the numpy code below (the reference); both check, before trusting
anything: the section length matches exactly, the unary stream holds exactly ``k`` one
bits, every position is below ``N``.
"""

from __future__ import annotations

import math
import struct
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from diffs.errors import DiffFormatError
from diffs.kernels import native

MODE_RICE = 0
MODE_ALL = 1
DEFAULT_BLOCK_LOG2 = 12
MAX_RICE_PARAM = 32
_U64 = np.uint64
_LOW_MASKS = (np.uint64(1) << np.arange(MAX_RICE_PARAM + 1, dtype=np.uint64)) - np.uint64(1)
"""``_LOW_MASKS[w]``: the low ``w`` bits set."""


def position_bound_bits(n: int, k: int) -> float:
    """``log2(C(n, k))``: the fewest bits that can say which ``k`` of ``n`` positions."""
    if k < 0 or k > n:
        raise ValueError("need 0 <= k <= n")
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def encode_positions(
    positions: npt.NDArray[Any], n: int, block_log2: int = DEFAULT_BLOCK_LOG2
) -> bytes:
    """Code strictly increasing ``positions`` (all below ``n``)."""
    pos = np.asarray(positions, dtype=np.int64)
    k = int(pos.size)
    if k and (pos[0] < 0 or pos[-1] >= n or np.any(np.diff(pos) <= 0)):
        raise ValueError("positions must be strictly increasing and in [0, n)")
    if k == n and n > 0:
        return bytes([MODE_ALL])
    gaps = np.diff(pos, prepend=-1) - 1
    block = 1 << block_log2
    params = _choose_params(gaps, block)
    widths = np.repeat(params, block)[:k].astype(np.int64)
    quotients = gaps >> widths
    unary = _pack_unary(quotients)
    remainders = _pack_fields(gaps & ((np.int64(1) << widths) - 1), widths)
    head = struct.pack("<BBQ", MODE_RICE, block_log2, len(unary))
    return head + params.astype(np.uint8).tobytes() + unary + remainders


class RiceStreams(NamedTuple):
    """The checked header of a RICE position section and views of its three streams.

    (A named tuple: built once per entry a device applies, it costs a fifth of what a
    frozen dataclass does.)"""

    block_log2: int
    params: memoryview
    """One Rice parameter (a byte) per block."""
    unary: memoryview
    remainders: memoryview
    pmax: int
    """The largest Rice parameter."""
    uniform: bool
    """Whether every block has the same Rice parameter."""


def decode_positions(section: bytes | memoryview, k: int, n: int) -> npt.NDArray[np.int64]:
    """Decode ``k`` positions below ``n``; raise :class:`DiffFormatError` on any defect."""
    if native is not None:
        try:  # the kernel checks the header as rice_streams does, with its messages
            decoded = native.rice_decode(section, k, n)
        except native.DecodeError as exc:
            raise DiffFormatError(str(exc)) from None
        if decoded is not None:
            return np.frombuffer(decoded, dtype=np.int64)
    # An ALL section (which the kernel leaves to this code), or no compiled kernels.
    streams = rice_streams(section, k, n)
    if streams is None:
        return np.arange(n, dtype=np.int64)
    return _decode_rice(streams, k, n)


def rice_streams(section: bytes | memoryview, k: int, n: int) -> RiceStreams | None:
    """Check a position section's mode, header and stream lengths for ``k`` positions
    below ``n``; ``None`` for an ALL section (every position), else its streams."""
    buf = memoryview(section).cast("B")
    if len(buf) < 1:
        raise DiffFormatError("position section is empty")
    mode = buf[0]
    if mode == MODE_ALL:
        if len(buf) != 1 or k != n:
            raise DiffFormatError("ALL position section must be 1 byte and have k == n")
        return None
    if mode != MODE_RICE:
        raise DiffFormatError(f"unknown position coding mode {mode}")
    if len(buf) < 10:
        raise DiffFormatError("position section truncated in its header")
    _, block_log2, unary_nbytes = struct.unpack_from("<BBQ", buf, 0)
    if not 8 <= block_log2 <= 20:
        raise DiffFormatError(f"position block size 2**{block_log2} out of range")
    block = 1 << block_log2
    nblocks = -(-k // block)
    params_end = 10 + nblocks
    if len(buf) < params_end or unary_nbytes > len(buf) - params_end:
        raise DiffFormatError("position section truncated")
    params = buf[10:params_end]
    # Per-entry overhead matters (a diff has one entry per tensor): the few parameters of
    # a typical entry are read by Python, only long runs of them by numpy.
    if nblocks <= 64:
        pmax, pmin = (max(params), min(params)) if nblocks else (0, 0)
        head_sum = sum(params[:-1])
    else:
        array = np.frombuffer(params, dtype=np.uint8)
        pmax, pmin = int(array.max()), int(array.min())
        head_sum = int(array[:-1].sum(dtype=np.int64))
    if pmax > MAX_RICE_PARAM:
        raise DiffFormatError("Rice parameter above 32")
    uniform = pmin == pmax
    # Every block holds `block` gaps but the last, which holds the rest.
    rem_bits = pmax * k if uniform else block * head_sum + params[-1] * (k - (nblocks - 1) * block)
    rem_start = params_end + unary_nbytes
    if len(buf) != rem_start + (rem_bits + 7) // 8:
        need = rem_start + (rem_bits + 7) // 8
        raise DiffFormatError(f"position section is {len(buf)} bytes, its streams need {need}")
    return RiceStreams(
        block_log2, params, buf[params_end:rem_start], buf[rem_start:], pmax, uniform
    )


def _decode_rice(streams: RiceStreams, k: int, n: int) -> npt.NDArray[np.int64]:
    """The numpy decoder: the reference the compiled one is held to."""
    params = np.frombuffer(streams.params, dtype=np.uint8)
    block, pmax = 1 << streams.block_log2, streams.pmax
    # One byte per gap when the blocks' widths differ: k-sized temporaries are what cost.
    widths: npt.NDArray[np.uint8] | int = pmax if streams.uniform else np.repeat(params, block)[:k]
    unary = np.frombuffer(streams.unary, dtype=np.uint8)
    bits = np.unpackbits(unary, bitorder="little").view(np.bool_)
    ones_count = int(np.count_nonzero(bits))  # before allocating 8 bytes per one bit
    if ones_count != k:
        raise DiffFormatError(f"unary stream codes {ones_count} gaps, expected {k}")
    ones = np.flatnonzero(bits)
    quotients = np.empty_like(ones)  # the gaps' quotients: ones[i] - ones[i-1] - 1
    if k:
        quotients[0] = ones[0]
        np.subtract(ones[1:], ones[:-1], out=quotients[1:])
        quotients[1:] -= 1
    # Per gap, q << r <= n - 1: so every gap is below n + 2**32 and no shift overflows.
    # (Checked on each block's largest quotient: no per-gap temporary.)
    if k and (
        int(quotients.max()) > ((n - 1) >> widths)
        if isinstance(widths, int)
        else bool(
            (
                np.maximum.reduceat(quotients, np.arange(0, k, block))
                > ((n - 1) >> params.astype(np.int64))
            ).any()
        )
    ):
        raise DiffFormatError("a gap runs past the end of the tensor")
    gaps = _unpack_fields(streams.remainders, widths, k)
    quotients <<= widths
    gaps |= quotients
    gaps += 1
    positions = np.cumsum(gaps, out=gaps)
    positions -= 1
    # The last position is the largest unless the int64 sum wrapped, which needs k gaps
    # summing past 2**63; only then are all positions checked.
    wrap_possible = k * (n + (1 << MAX_RICE_PARAM)) >= 1 << 63
    if k and (positions[-1] >= n or (wrap_possible and int(positions.max()) >= n)):
        raise DiffFormatError(f"a position is outside a tensor of {n}")
    return positions


def _choose_params(gaps: npt.NDArray[np.int64], block: int) -> npt.NDArray[np.int64]:
    """Per block, the Rice parameter that minimizes the block's coded bits."""
    k = gaps.size
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    nblocks = -(-k // block)
    padded = np.zeros(nblocks * block, dtype=np.int64)
    padded[:k] = gaps
    blocks = padded.reshape(nblocks, block)
    counts = np.full(nblocks, block, dtype=np.int64)
    counts[-1] = k - (nblocks - 1) * block
    mean = blocks.sum(axis=1) / counts
    guess = np.clip(np.floor(np.log2(np.maximum(mean * math.log(2), 1.0))), 0, MAX_RICE_PARAM)
    best: npt.NDArray[np.int64] = guess.astype(np.int64)
    best_cost = np.full(nblocks, np.iinfo(np.int64).max, dtype=np.int64)
    for delta in (-2, -1, 0, 1, 2):
        cand = np.clip(guess.astype(np.int64) + delta, 0, MAX_RICE_PARAM)
        cost = (blocks >> cand[:, None]).sum(axis=1) + counts * (1 + cand)
        better = cost < best_cost
        best = np.where(better, cand, best).astype(np.int64)
        best_cost = np.where(better, cost, best_cost)
    return best


def _pack_unary(quotients: npt.NDArray[np.int64]) -> bytes:
    if quotients.size == 0:
        return b""
    ends = np.cumsum(quotients + 1) - 1
    bits = np.zeros(int(ends[-1]) + 1, dtype=np.uint8)
    bits[ends] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def _pack_fields(values: npt.NDArray[np.int64], widths: npt.NDArray[np.int64]) -> bytes:
    """Concatenate the low ``widths[i]`` bits of each ``values[i]``, LSB-first."""
    total = int(widths.sum())
    if total == 0:
        return b""
    starts = np.cumsum(widths) - widths
    bits = np.zeros(total, dtype=np.uint8)
    for j in range(int(widths.max())):
        has = widths > j
        bits[starts[has] + j] = (values[has] >> j) & 1
    return np.packbits(bits, bitorder="little").tobytes()


def _unpack_fields(
    stream: memoryview, widths: npt.NDArray[np.uint8] | int, k: int
) -> npt.NDArray[np.int64]:
    """Inverse of :func:`_pack_fields` (widths up to 32): one gather of 64-bit windows.

    ``widths`` is one int when every field has the same width (the common case, and the
    fastest), else one width per field.
    """
    if k == 0 or (isinstance(widths, int) and widths == 0):
        return np.zeros(k, dtype=np.int64)
    padded = np.frombuffer(bytes(stream) + bytes(8), dtype=np.uint8)
    windows: npt.NDArray[np.uint64] = np.ndarray(
        shape=(len(stream) + 1,), dtype="<u8", buffer=padded, strides=(1,)
    )
    if isinstance(widths, int):
        starts = np.arange(0, k * widths, widths, dtype=np.int64)
        masks: npt.NDArray[np.uint64] | np.uint64 = _U64((1 << widths) - 1)
    else:
        starts = np.cumsum(widths, dtype=np.int64)
        starts -= widths
        masks = np.take(_LOW_MASKS, widths)
    fields = np.take(windows, starts >> 3)
    starts &= 7
    fields >>= starts.view(_U64)
    fields &= masks
    result: npt.NDArray[np.int64] = fields.view(np.int64)
    return result
