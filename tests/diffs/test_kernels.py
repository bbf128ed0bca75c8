"""The compiled kernels (:mod:`diffs.kernels`) against the numpy code they stand in for:
the same positions, the same bits in the patched tensor, and the same verdict -- the same
error message, for position streams -- on mutated, truncated and mislabelled input."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffs.entries
import diffs.positions
from diffs.container import DEFAULT_OPTIONS, Diff, DiffReader, EncodeOptions, diff_bytes
from diffs.direct import patch_direct
from diffs.dtypes import DType
from diffs.entries import ExactEntry, SparseEntry, patch_in_place
from diffs.errors import DiffFormatError, IncompatibleModelError
from diffs.kernels import native
from diffs.positions import _decode_rice, encode_positions, rice_streams
from diffs.safetensors_file import numel
from diffs.values import Codec, ValueFormat, Values
from tests.diffs import random_bits_tensor
from tests.diffs.test_roundtrip import exact_entries, options, position_sets, seeds, values_of

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ZERO = "sha256:" + "0" * 64

needs_native = pytest.mark.skipif(
    native is None, reason="compiled kernels not built (test_the_kernels_are_built says why)"
)


def test_the_kernels_are_built() -> None:
    """The install builds them wherever a C compiler is at hand, as it is in CI; without
    them every other test here would be skipped and apply would run the numpy code."""
    if os.environ.get("DIFFCAST_NATIVE") == "0":
        pytest.skip("DIFFCAST_NATIVE=0: the numpy code is asked for")
    assert native is not None, (
        "diffs._native did not build: install gcc and the Python headers, then `make install`"
    )


def test_the_environment_can_turn_them_off() -> None:
    code = "from diffs.kernels import backend; print(backend())"
    env = {**os.environ, "DIFFCAST_NATIVE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "numpy"


@pytest.mark.parametrize("native_on", [True, False], ids=["native", "numpy"])
def test_the_cli_says_which_code_runs(native_on: bool) -> None:
    env = {**os.environ, "DIFFCAST_NATIVE": "1" if native_on else "0", "COLUMNS": "200"}
    diffcast = os.path.join(os.path.dirname(sys.executable), "diffcast")
    out = subprocess.run(
        [diffcast, "diff", "kernels"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    if not native_on or native is None:
        assert out.startswith("numpy (compiled kernels ")
        return
    # The prefetch is chosen by CPU vendor when the module loads (see diffs/_native.c).
    with open("/proc/cpuinfo") as cpuinfo:
        intel = "GenuineIntel" in cpuinfo.read()
    how = "by the CPU alone" if intel else "as each position is decoded"
    assert out == f"native (compiled; cache lines to write prefetched {how})"


# ---------------------------------------------------------------------------------------
# position decoding


def _outcome(decode: Any) -> tuple[str, bytes | str]:
    try:
        positions = decode()
    except DiffFormatError as exc:
        return "error", str(exc)
    return "ok", np.asarray(positions, dtype=np.int64).tobytes()


def _both(section: bytes, k: int, n: int) -> tuple[tuple[str, Any], tuple[str, Any]]:
    """What the compiled and the numpy decoder make of a section."""

    def numpy_decode() -> npt.NDArray[np.int64]:
        streams = rice_streams(section, k, n)
        return np.arange(n) if streams is None else _decode_rice(streams, k, n)

    return _outcome(lambda: diffs.positions.decode_positions(section, k, n)), _outcome(numpy_decode)


@needs_native
@SETTINGS
@given(st.data(), st.integers(1, 5000), st.sampled_from([8, 9, 12]))
def test_decode_gives_the_numpy_positions(data: st.DataObject, n: int, block_log2: int) -> None:
    positions = data.draw(position_sets(n))
    section = encode_positions(positions, n, block_log2)
    ours, reference = _both(section, positions.size, n)
    assert ours == reference == ("ok", positions.tobytes())


def _mutated_section(data: st.DataObject, n: int) -> tuple[bytes, int, int]:
    """A position section for ``n`` elements, mutated, with the ``k`` and ``n`` to read
    it with (each perhaps off by a little)."""
    positions = data.draw(position_sets(n))
    section = bytearray(encode_positions(positions, n, data.draw(st.sampled_from([8, 12]))))
    k = positions.size
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "byte", "truncate", "append"]))
        if how == "flip" and section:
            at = data.draw(st.integers(0, len(section) - 1))
            section[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "byte" and section:
            section[data.draw(st.integers(0, len(section) - 1))] = data.draw(st.integers(0, 255))
        elif how == "truncate":
            del section[data.draw(st.integers(0, len(section))) :]
        else:
            section += bytes(data.draw(st.binary(min_size=1, max_size=9)))
    k = max(0, min(n, k + data.draw(st.integers(-2, 2))))
    return bytes(section), k, max(k, n + data.draw(st.integers(-3, 3)))


@needs_native
@SETTINGS
@given(st.data(), st.integers(1, 3000))
def test_decode_agrees_with_numpy_on_mutated_sections(data: st.DataObject, n: int) -> None:
    ours, reference = _both(*_mutated_section(data, n))
    assert ours == reference


@needs_native
@SETTINGS
@given(st.data(), st.integers(1, 3000))
def test_patch_reads_mutated_sections_as_numpy_does(data: st.DataObject, n: int) -> None:
    # patch_section parses the section's header in C: the same verdict and message as
    # the numpy decoder, the same positions written, and nothing written on an error.
    section, k, n_read = _mutated_section(data, n)
    base = np.arange(n_read, dtype=np.uint32)
    target = base.copy()
    values = np.arange(1, k + 1, dtype=np.uint32) << np.uint32(8)
    outcome: tuple[str, bytes | str]
    try:
        done = native.patch_section(section, k, n_read, target, values, b"", -1, 4, False)
    except native.DecodeError as exc:
        outcome = "error", str(exc)
        assert target.tobytes() == base.tobytes()
    else:
        if not done:  # an ALL section: left to the Python code
            assert section[:1] == b"\x01" and target.tobytes() == base.tobytes()
            return
        outcome = "ok", np.flatnonzero(target != base).astype(np.int64).tobytes()
    assert outcome == _both(section, k, n_read)[1]


_GUARDED_READ = """
import ctypes, mmap, sys
import numpy as np
from diffs.kernels import native
from diffs.positions import decode_positions, encode_positions

page = mmap.PAGESIZE
for k in (1, 2, 3, 5):
    positions = np.arange(k, dtype=np.int64) * 3 + 1  # gaps of 2: one remainder bit each
    section = encode_positions(positions, 3 * k + 1, 8)
    buf = mmap.mmap(-1, 2 * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mprotect(ctypes.c_void_p(base + page), page, 0) != 0:  # PROT_NONE
        sys.exit("mprotect failed")
    at = page - len(section)  # the section's last byte is the last readable one
    buf[at:page] = section
    view = memoryview(buf)[at:page]
    assert decode_positions(view, k, 3 * k + 1).tolist() == positions.tolist()
    target = np.zeros(3 * k + 1, np.uint32)
    ones = np.ones(k, np.uint32)
    assert native.patch_section(view, k, 3 * k + 1, target, ones, b"", -1, 4, False)
    assert np.flatnonzero(target).tolist() == positions.tolist()
print("ok")
"""


@needs_native
def test_short_streams_are_not_read_past_their_end() -> None:
    # Remainders are loaded 8 bytes at a time except near the end of their stream: a
    # section whose last byte is the last readable byte of memory must decode (a read
    # past it would kill the process, hence the child process).
    out = subprocess.run(
        [sys.executable, "-c", _GUARDED_READ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.returncode, out.stdout.strip()) == (0, "ok"), out.stderr[-2000:]


@needs_native
def test_decode_reports_a_gap_past_the_end_as_numpy_does() -> None:
    # A quotient too large for the tensor comes after a position already past its end:
    # numpy checks every quotient before any position, so must the kernel.
    positions = np.array([3, 9, 10, 400], dtype=np.int64)
    section = encode_positions(positions, 401, 8)
    ours, reference = _both(section, 4, 12)
    assert ours == reference
    assert reference[0] == "error"


# ---------------------------------------------------------------------------------------
# applying straight from the sections


@st.composite
def covered_entries(draw: st.DrawFn) -> SparseEntry | ExactEntry:
    """Entries :func:`patch_direct` takes: exact (any dtype) or F32 sparse (any format)."""
    if draw(st.booleans()):
        return draw(exact_entries("w"))
    n = draw(st.integers(1, 3000))
    positions = draw(position_sets(n))
    fmt = draw(st.sampled_from(list(ValueFormat)))
    values = draw(values_of(fmt, positions.size))
    if fmt is ValueFormat.F32 and draw(st.booleans()):  # NaNs, infinities, subnormals
        rng = np.random.default_rng(draw(seeds))
        bits = rng.integers(0, 2**32, positions.size, dtype=np.uint32)
        values = Values(ValueFormat.F32, bits.view(np.float32))
    return SparseEntry("w", DType.F32, (n,), positions, values)


def _base_for(entry: SparseEntry | ExactEntry, seed: int) -> npt.NDArray[Any]:
    tensor = random_bits_tensor(np.random.default_rng(seed), entry.dtype, entry.shape)
    return np.array(tensor.array, copy=True).reshape(-1)


def _decoded(
    reader: DiffReader, flat: npt.NDArray[Any], monkeypatch: pytest.MonkeyPatch, numpy_only: bool
) -> None:
    with monkeypatch.context() as m:
        if numpy_only:
            m.setattr(diffs.positions, "native", None)
            m.setattr(diffs.entries, "native", None)
        entry = reader.entry(0)
        assert isinstance(entry, SparseEntry | ExactEntry)
        patch_in_place(flat, entry.dtype, entry)


@needs_native
@SETTINGS
@given(covered_entries(), options, seeds)
def test_direct_apply_gives_the_bits_of_the_numpy_path(
    entry: SparseEntry | ExactEntry, opts: EncodeOptions, seed: int
) -> None:
    base = _base_for(entry, seed)
    with DiffReader(diff_bytes(Diff(ZERO, ZERO, [entry]), opts)) as reader:
        direct, decoded, reference = base.copy(), base.copy(), base.copy()
        took = patch_direct(reader, 0, direct)
        # An entry of every position has no position stream to decode: decoded path.
        n = numel(entry.shape)
        assert took == (entry.positions.size < n or n == 0)
        with pytest.MonkeyPatch.context() as mp:
            _decoded(reader, decoded, mp, numpy_only=False)
            _decoded(reader, reference, mp, numpy_only=True)
    if not took:
        patch_in_place(direct, entry.dtype, entry)
    assert direct.tobytes() == decoded.tobytes() == reference.tobytes()


def _large_entry(kind: str, dtype: DType, style: str) -> SparseEntry | ExactEntry:
    """Some 9000 positions over 40 000 elements, dense in one stretch and sparse in
    another (so the Rice blocks differ in parameter, and the kernel works in several
    chunks), with values that make the encoder pick one codec or another."""
    rng = np.random.default_rng([7, len(style), len(dtype.value)])
    n = 40_000
    density = np.where(np.arange(n) < 12_000, 0.6, 0.05)
    positions = np.flatnonzero(rng.random(n) < density).astype(np.int64)
    k = positions.size
    storage = np.dtype(np.float32) if kind == "sparse" else dtype.bits
    if style == "bits":  # incompressible: raw
        data = rng.integers(0, 256, k * storage.itemsize, dtype=np.uint8).view(storage)
    elif style == "small":  # random low bytes, constant high ones: planes
        data = rng.integers(0, 200, k).astype(storage)
        if kind == "sparse":
            data = (rng.standard_normal(k) * 1e-3).astype(np.float32)
    elif style == "narrow":  # every byte plane compresses: shuffle
        data = rng.integers(0, 16, k).astype(storage)
        if kind == "sparse":  # deltas cut to their top 12 bits
            cut = (rng.standard_normal(k) * 1e-3).astype(np.float32).view(np.uint32)
            data = (cut & np.uint32(0xFFF00000)).view(np.float32)
    else:  # a short repeating pattern: zstd
        data = np.resize(
            rng.integers(0, 256, 64 * storage.itemsize, dtype=np.uint8), k * storage.itemsize
        ).view(storage)
    if kind == "sparse":
        return SparseEntry("w", DType.F32, (n,), positions, Values(ValueFormat.F32, data))
    return ExactEntry("w", dtype, (n,), positions, data)


LARGE_CASES = [("sparse", DType.F32)] + [("exact", d) for d in DType]


@needs_native
@pytest.mark.parametrize("fmt", [f for f in ValueFormat if f is not ValueFormat.F32])
def test_direct_apply_widens_other_formats_as_numpy_does(
    fmt: ValueFormat, monkeypatch: pytest.MonkeyPatch
) -> None:
    f32 = _large_entry("sparse", DType.F32, "small")
    assert isinstance(f32, SparseEntry)
    entry = SparseEntry(
        "w", DType.F32, f32.shape, f32.positions, Values.quantize(f32.values.data * 300, fmt)
    )
    base = _base_for(entry, 5)
    with DiffReader(diff_bytes(Diff(ZERO, ZERO, [entry]), DEFAULT_OPTIONS)) as reader:
        direct, reference = base.copy(), base.copy()
        assert patch_direct(reader, 0, direct)
        _decoded(reader, reference, monkeypatch, numpy_only=True)
    assert direct.tobytes() == reference.tobytes() != base.tobytes()


@needs_native
@pytest.mark.parametrize("style", ["bits", "small", "narrow", "pattern"])
@pytest.mark.parametrize(("kind", "dtype"), LARGE_CASES, ids=lambda c: getattr(c, "value", c))
def test_direct_apply_of_large_entries_gives_the_numpy_bits(
    kind: str, dtype: DType, style: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = _large_entry(kind, dtype, style)
    base = _base_for(entry, 11)
    with DiffReader(diff_bytes(Diff(ZERO, ZERO, [entry]), DEFAULT_OPTIONS)) as reader:
        spec = reader.specs[0]
        codec = spec.codec if spec.values is None else spec.values.codec
        if dtype.itemsize > 1:  # one-byte values have no planes to shuffle
            expected = {
                "bits": Codec.RAW,
                "small": Codec.PLANES,
                "narrow": Codec.SHUFFLE,
                "pattern": Codec.ZSTD,
            }[style]
            assert codec is expected, "the case no longer covers the codec it is meant to"
        decoded_entry = reader.entry(0)  # positions by the compiled decoder
        assert isinstance(decoded_entry, SparseEntry | ExactEntry)
        assert decoded_entry.positions.tobytes() == entry.positions.tobytes()
        direct, decoded, reference = base.copy(), base.copy(), base.copy()
        assert patch_direct(reader, 0, direct)
        _decoded(reader, decoded, monkeypatch, numpy_only=False)
        _decoded(reader, reference, monkeypatch, numpy_only=True)
    assert direct.tobytes() == decoded.tobytes() == reference.tobytes()
    assert direct.tobytes() != base.tobytes() or (kind == "exact" and style in ("small", "narrow"))


@needs_native
@SETTINGS
@given(covered_entries(), st.data(), seeds)
def test_bad_sections_leave_the_tensor_as_it_was(
    entry: SparseEntry | ExactEntry, data: st.DataObject, seed: int
) -> None:
    raw = bytearray(diff_bytes(Diff(ZERO, ZERO, [entry]), DEFAULT_OPTIONS))
    # Mutate the data area (after the header) only, so the file still opens.
    header_end = 8 + int.from_bytes(raw[:8], "little")
    if len(raw) <= header_end:
        return
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(header_end, len(raw) - 1))
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    base = _base_for(entry, seed)
    direct, decoded = base.copy(), base.copy()
    with DiffReader(bytes(raw)) as reader:
        try:
            patch_direct(reader, 0, direct)
        except DiffFormatError:
            assert direct.tobytes() == base.tobytes()
            with pytest.raises(DiffFormatError), pytest.MonkeyPatch.context() as mp:
                _decoded(reader, decoded, mp, numpy_only=True)


# ---------------------------------------------------------------------------------------
# the scatters of decoded entries


@needs_native
@pytest.mark.parametrize(
    "positions", [[3, 2], [1, 1], [0, 10], [-1, 2]], ids=["down", "repeat", "past-end", "neg"]
)
@pytest.mark.parametrize("kind", ["exact", "sparse"])
def test_scatter_refuses_bad_positions_before_writing(positions: list[int], kind: str) -> None:
    flat = np.arange(10, dtype=np.float32)
    pos = np.array(positions, dtype=np.int64)
    entry: SparseEntry | ExactEntry = (
        ExactEntry("w", DType.F32, (10,), pos, np.ones(2, np.uint32))
        if kind == "exact"
        else SparseEntry(
            "w", DType.F32, (10,), pos, Values(ValueFormat.F32, np.ones(2, np.float32))
        )
    )
    with pytest.raises(IncompatibleModelError, match="not above the previous one"):
        patch_in_place(flat, DType.F32, entry)
    assert flat.tobytes() == np.arange(10, dtype=np.float32).tobytes()


@needs_native
@pytest.mark.parametrize("add", [False, True], ids=["xor", "add"])
@pytest.mark.parametrize("cut", [1, 2500], ids=["last-position", "late-chunk"])
def test_a_late_bad_position_puts_back_the_chunks_already_applied(add: bool, cut: int) -> None:
    # Positions are checked a chunk at a time as they are applied: a position past the
    # end in a late chunk must undo every chunk before it.
    assert native is not None
    entry = _large_entry("exact", DType.F32, "bits")
    positions = entry.positions
    n = int(positions[-cut])  # positions[-cut:] are now past the end
    section = encode_positions(positions, 40_000, 8)
    target = np.arange(n, dtype=np.float32)
    values = np.full(positions.size, 3.0, np.float32)
    with pytest.raises(native.DecodeError, match=f"a position is outside a tensor of {n}"):
        native.patch_section(section, positions.size, n, target, values, b"", -1, 4, add)
    assert target.tobytes() == np.arange(n, dtype=np.float32).tobytes()
