"""Encode -> decode round trips of every entry kind, value format, codec and dtype.

Every diff is encoded with :func:`diffs.container.diff_bytes` (or written with
:func:`~diffs.container.write_diff`) and decoded with :class:`~diffs.container.DiffReader`;
entries are compared field by field, values bit for bit. The position coder has its own
round trips, and its size is checked against ``log2(C(N, k))``.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffs.container import (
    DEFAULT_OPTIONS,
    Diff,
    DiffReader,
    EncodeOptions,
    diff_bytes,
    write_diff,
)
from diffs.dtypes import DType
from diffs.entries import (
    AddEntry,
    Entry,
    ExactEntry,
    HashedEntry,
    RemoveEntry,
    ReplaceEntry,
    SparseEntry,
)
from diffs.errors import DiffFormatError
from diffs.model import Tensor
from diffs.positions import decode_positions, encode_positions, position_bound_bits
from diffs.safetensors_file import numel, sort_key
from diffs.values import Codec, ValueFormat, Values, decode_array, encode_array
from tests.diffs import ALL_DTYPES, FLOAT_DTYPES, assert_same_diff, random_bits_tensor

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------
# strategies

names = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)
digests = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())
seeds = st.integers(0, 2**32 - 1)
small_shapes = st.lists(st.integers(0, 6), max_size=3).map(tuple)
# One dimension past 256 elements: more than one position block at block_log2 = 8.
long_shapes = st.integers(257, 1500).map(lambda n: (n,))
shapes = st.one_of(small_shapes, small_shapes, long_shapes)


@st.composite
def position_sets(draw: st.DrawFn, n: int) -> npt.NDArray[np.int64]:
    """Strictly increasing positions below ``n``: none, all, uniform, clustered, edges."""
    if n == 0:
        return np.zeros(0, np.int64)
    style = draw(st.sampled_from(["none", "all", "uniform", "clustered", "edges"]))
    rng = np.random.default_rng(draw(seeds))
    if style == "none":
        return np.zeros(0, np.int64)
    if style == "all":
        return np.arange(n, dtype=np.int64)
    if style == "edges":
        return np.unique(np.array([0, n - 1], dtype=np.int64))
    if style == "uniform":
        density = draw(st.floats(0.0, 1.0))
        return np.flatnonzero(rng.random(n) < density).astype(np.int64)
    # clustered: a few runs of consecutive positions
    mask = np.zeros(n, bool)
    for _ in range(draw(st.integers(1, 4))):
        start = int(rng.integers(0, n))
        mask[start : start + int(rng.integers(1, 40))] = True
    return np.flatnonzero(mask).astype(np.int64)


def _array(rng: np.random.Generator, dtype: np.dtype[Any], count: int, style: str) -> Any:
    """``count`` elements of ``dtype``: random bits, small floats, or one repeated value."""
    if style == "bits" or count == 0:
        raw = rng.integers(0, 256, count * dtype.itemsize, dtype=np.uint8)
        return raw.view(dtype).copy()
    if style == "small":  # compressible high bytes (the shuffle codec's case)
        if dtype.kind == "f":
            return (rng.standard_normal(count) * 1e-3).astype(dtype)
        return rng.integers(0, 4, count).astype(dtype)
    return np.full(count, rng.integers(0, 127), dtype=np.uint8).view(np.uint8).astype(dtype)


styles = st.sampled_from(["bits", "small", "constant"])


@st.composite
def values_of(draw: st.DrawFn, fmt: ValueFormat, count: int) -> Values:
    rng = np.random.default_rng(draw(seeds))
    data = _array(rng, fmt.storage, count, draw(styles))
    if fmt is ValueFormat.I8:
        scale = draw(st.floats(width=32, allow_nan=False, allow_infinity=False))
        return Values(fmt, data, scale)
    return Values(fmt, data)


@st.composite
def sparse_entries(draw: st.DrawFn, name: str) -> SparseEntry:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    shape = draw(shapes)
    positions = draw(position_sets(numel(shape)))
    fmt = draw(st.sampled_from(list(ValueFormat)))
    return SparseEntry(name, dtype, shape, positions, draw(values_of(fmt, positions.size)))


@st.composite
def hashed_entries(draw: st.DrawFn, name: str) -> HashedEntry:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    fmt = draw(st.sampled_from(list(ValueFormat)))
    buckets = draw(values_of(fmt, draw(st.integers(1, 300))))
    return HashedEntry(name, dtype, draw(shapes), draw(st.integers(0, 2**64 - 1)), buckets)


@st.composite
def exact_entries(draw: st.DrawFn, name: str) -> ExactEntry:
    dtype = draw(st.sampled_from(ALL_DTYPES))
    shape = draw(shapes)
    positions = draw(position_sets(numel(shape)))
    rng = np.random.default_rng(draw(seeds))
    xor = _array(rng, dtype.bits, positions.size, draw(styles))
    return ExactEntry(name, dtype, shape, positions, xor)


@st.composite
def tensors(draw: st.DrawFn) -> Tensor:
    dtype = draw(st.sampled_from(ALL_DTYPES))
    rng = np.random.default_rng(draw(seeds))
    return random_bits_tensor(rng, dtype, draw(shapes))


@st.composite
def entries(draw: st.DrawFn, name: str) -> Entry:
    kind = draw(st.sampled_from(["sparse", "hashed", "exact", "replace", "add", "remove"]))
    if kind == "sparse":
        return draw(sparse_entries(name))
    if kind == "hashed":
        return draw(hashed_entries(name))
    if kind == "exact":
        return draw(exact_entries(name))
    if kind == "replace":
        return ReplaceEntry(name, draw(tensors()))
    if kind == "add":
        return AddEntry(name, draw(tensors()))
    return RemoveEntry(name, draw(st.sampled_from(ALL_DTYPES)), draw(shapes))


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=8),
)
infos = st.dictionaries(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=8),
    st.one_of(json_scalars, st.lists(json_scalars, max_size=3)),
    max_size=4,
)


@st.composite
def diffs(draw: st.DrawFn) -> Diff:
    entry_names = draw(st.lists(names, unique=True, max_size=6))
    items = [draw(entries(name)) for name in entry_names]
    return Diff(draw(digests), draw(digests), items, draw(infos))


options = st.builds(
    EncodeOptions,
    zstd_level=st.sampled_from([1, 19]),
    position_block_log2=st.sampled_from([8, 12, 20]),
)


def roundtrip(diff: Diff, opts: EncodeOptions = DEFAULT_OPTIONS) -> Diff:
    with DiffReader(diff_bytes(diff, opts)) as reader:
        return reader.read()


# ---------------------------------------------------------------------------------------
# entry round trips


@SETTINGS
@given(st.data(), options)
def test_sparse_roundtrip(data: st.DataObject, opts: EncodeOptions) -> None:
    entry = data.draw(sparse_entries("w"))
    diff = Diff("sha256:" + "a" * 64, "sha256:" + "b" * 64, [entry])
    assert_same_diff(roundtrip(diff, opts), diff)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.value)
@pytest.mark.parametrize("fmt", list(ValueFormat), ids=lambda f: f.value)
def test_sparse_every_format_on_every_float_dtype(dtype: DType, fmt: ValueFormat) -> None:
    rng = np.random.default_rng(7)
    positions = np.sort(rng.choice(300, 40, replace=False)).astype(np.int64)
    values = Values.quantize(rng.standard_normal(40) * 0.1, fmt)
    entry = SparseEntry("layer.weight", dtype, (10, 30), positions, values)
    diff = Diff("sha256:" + "1" * 64, "sha256:" + "2" * 64, [entry], {"method": "sparse"})
    assert_same_diff(roundtrip(diff), diff)


@SETTINGS
@given(st.data())
def test_hashed_roundtrip(data: st.DataObject) -> None:
    entry = data.draw(hashed_entries("h"))
    diff = Diff("sha256:" + "c" * 64, "sha256:" + "d" * 64, [entry])
    got = roundtrip(diff)
    assert_same_diff(got, diff)
    assert isinstance(got.entries[0], HashedEntry)
    assert got.entries[0].seed == entry.seed


@SETTINGS
@given(st.data(), options)
def test_exact_roundtrip(data: st.DataObject, opts: EncodeOptions) -> None:
    entry = data.draw(exact_entries("x"))
    diff = Diff("sha256:" + "e" * 64, "sha256:" + "f" * 64, [entry])
    assert_same_diff(roundtrip(diff, opts), diff)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.value)
def test_exact_every_dtype(dtype: DType) -> None:
    rng = np.random.default_rng(3)
    positions = np.array([0, 3, 4, 9, 59], dtype=np.int64)
    xor = rng.integers(1, 256, positions.size).astype(dtype.bits)
    diff = Diff(
        "sha256:" + "0" * 64,
        "sha256:" + "1" * 64,
        [ExactEntry("t", dtype, (6, 10), positions, xor)],
    )
    assert_same_diff(roundtrip(diff), diff)


@SETTINGS
@given(st.data())
def test_replace_add_remove_roundtrip(data: st.DataObject) -> None:
    replace = ReplaceEntry("r", data.draw(tensors()))
    add = AddEntry("a", data.draw(tensors()))
    remove = RemoveEntry("z", data.draw(st.sampled_from(ALL_DTYPES)), data.draw(shapes))
    diff = Diff("sha256:" + "1" * 64, "sha256:" + "2" * 64, [remove, replace, add])
    got = roundtrip(diff)
    assert [type(e) for e in got.entries] == [AddEntry, ReplaceEntry, RemoveEntry]
    assert_same_diff(got, diff)


@SETTINGS
@given(diffs(), options)
def test_mixed_diff_roundtrip(diff: Diff, opts: EncodeOptions) -> None:
    encoded = diff_bytes(diff, opts)
    with DiffReader(encoded) as reader:
        assert reader.base_digest == diff.base_digest
        assert reader.target_digest == diff.target_digest
        assert [s.name for s in reader.specs] == sorted(
            (e.name for e in diff.entries), key=sort_key
        )
        got = reader.read()
    assert_same_diff(got, diff)
    # encoding is a function of the diff alone: entry order does not matter
    shuffled = Diff(diff.base_digest, diff.target_digest, list(reversed(diff.entries)), diff.info)
    assert diff_bytes(shuffled, opts) == encoded


@settings(max_examples=20, deadline=None)
@given(diffs())
def test_write_diff_equals_diff_bytes_and_reads_back_from_a_path(diff: Diff) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "update.diff"
        manifest = write_diff(path, diff)
        assert path.read_bytes() == diff_bytes(diff)
        assert [p.name for p in Path(tmp).iterdir()] == ["update.diff"]  # no temp files left
        with DiffReader(path) as reader:
            assert reader.manifest == manifest
            got = reader.read()
        assert_same_diff(got, diff)


def _codecs(diff: Diff) -> set[Codec]:
    with DiffReader(diff_bytes(diff)) as reader:
        found = set()
        for spec in reader.specs:
            if spec.values is not None:
                found.add(spec.values.codec)
            if spec.codec is not None:
                found.add(spec.codec)
        return found


@pytest.mark.parametrize(
    ("array", "codec"),
    [
        (np.random.default_rng(0).integers(0, 2**16, 500).astype("<u2"), Codec.RAW),
        (np.full(500, 0x3C00, "<u2"), Codec.ZSTD),
        # every byte plane compresses: one frame of them all
        (np.random.default_rng(2).integers(0, 16, 2000).astype("<u2"), Codec.SHUFFLE),
        # random low bytes stored raw, nearly constant high bytes in the frame
        ((np.random.default_rng(1).standard_normal(2000) * 1e-3).astype("<f4"), Codec.PLANES),
    ],
    ids=["raw", "zstd", "shuffle", "planes"],
)
def test_every_codec_round_trips(array: npt.NDArray[Any], codec: Codec) -> None:
    """The codecs are each chosen for the data they suit, and each decodes."""
    n = array.size
    positions = np.arange(n, dtype=np.int64)
    if array.dtype == np.dtype("<f4"):
        entry: Entry = SparseEntry("s", DType.F32, (n,), positions, Values(ValueFormat.F32, array))
    else:
        entry = ExactEntry("x", DType.F16, (n,), positions, array)
    diff = Diff("sha256:" + "3" * 64, "sha256:" + "4" * 64, [entry])
    assert _codecs(diff) == {codec}
    assert_same_diff(roundtrip(diff), diff)


def test_planes_section_stores_random_planes_raw_and_the_rest_in_one_frame() -> None:
    """The layout of a ``planes`` section, byte for byte but for the frame's own bytes:
    the mask, then the raw planes in order, then one frame of the other planes in order."""
    rng = np.random.default_rng(3)
    count = 3000
    planes = np.stack(
        [
            rng.integers(0, 256, count, dtype=np.uint8),  # random: raw
            np.full(count, 7, np.uint8),  # constant: packed
            rng.integers(0, 256, count, dtype=np.uint8),  # random: raw
            rng.integers(0, 3, count).astype(np.uint8),  # skewed: packed
        ]
    )
    array = np.ascontiguousarray(planes.T).view("<u4").reshape(-1)
    section = encode_array(array, Codec.PLANES, 19)
    assert section[0] == 0b0101
    assert section[1 : 1 + 2 * count] == planes[[0, 2]].tobytes()
    frame = section[1 + 2 * count :]
    assert zstandard.ZstdDecompressor().decompress(frame) == planes[[1, 3]].tobytes()
    assert decode_array(section, Codec.PLANES, np.dtype("<u4"), count).tobytes() == array.tobytes()


@pytest.mark.parametrize("mask", range(16))
def test_planes_decode_whatever_planes_are_raw(mask: int) -> None:
    """Readers take any mask a writer might choose, runs of packed planes or not."""
    rng = np.random.default_rng(mask)
    count = 257
    array = rng.integers(0, 2**32, count, dtype=np.uint64).astype("<u4")
    planes = array.view(np.uint8).reshape(-1, 4).T
    raw = [j for j in range(4) if mask >> j & 1]
    packed = [j for j in range(4) if not mask >> j & 1]
    frame = zstandard.ZstdCompressor().compress(planes[packed].tobytes()) if packed else b""
    section = bytes([mask]) + planes[raw].tobytes() + frame
    assert decode_array(section, Codec.PLANES, np.dtype("<u4"), count).tobytes() == array.tobytes()


def test_i8_values_keep_their_scale_exactly() -> None:
    scale = float(np.float32(1 / 3))
    values = Values(ValueFormat.I8, np.array([-127, -1, 0, 1, 127], np.int8), scale)
    entry = SparseEntry("w", DType.BF16, (5,), np.arange(5, dtype=np.int64), values)
    got = roundtrip(Diff("sha256:" + "5" * 64, "sha256:" + "6" * 64, [entry])).entries[0]
    assert isinstance(got, SparseEntry)
    assert got.values.scale == scale
    np.testing.assert_array_equal(got.values.widened(), values.widened())


def test_empty_diff_roundtrip() -> None:
    diff = Diff("sha256:" + "7" * 64, "sha256:" + "7" * 64, [], {"method": "exact"})
    assert_same_diff(roundtrip(diff), diff)


# ---------------------------------------------------------------------------------------
# positions


@SETTINGS
@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.just(n), position_sets(n))))
def test_positions_roundtrip(case: tuple[int, npt.NDArray[np.int64]]) -> None:
    n, positions = case
    for block_log2 in (8, 12, 20):
        section = encode_positions(positions, n, block_log2)
        decoded = decode_positions(section, positions.size, n)
        assert decoded.dtype == np.int64
        np.testing.assert_array_equal(decoded, positions)


@pytest.mark.parametrize(
    ("n", "positions"),
    [
        (1, []),
        (1, [0]),
        (2, [1]),
        (7, []),
        (7, list(range(7))),
        (1000, list(range(999))),  # k = N - 1
        (1000, list(range(500, 1000))),  # one run at the end
        (2**33, [0, 2**33 - 1]),  # the largest tensor the limits allow
        (2**20 + 3, [2**20 + 2]),
    ],
)
def test_positions_edge_cases(n: int, positions: list[int]) -> None:
    pos = np.array(positions, dtype=np.int64)
    section = encode_positions(pos, n)
    np.testing.assert_array_equal(decode_positions(section, pos.size, n), pos)


def test_positions_all_is_one_byte() -> None:
    assert encode_positions(np.arange(100), 100) == b"\x01"
    np.testing.assert_array_equal(decode_positions(b"\x01", 100, 100), np.arange(100))


def test_positions_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        encode_positions(np.array([3, 3]), 10)
    with pytest.raises(ValueError, match="strictly increasing"):
        encode_positions(np.array([10]), 10)
    section = encode_positions(np.array([1, 5, 8]), 10)
    with pytest.raises(DiffFormatError):
        decode_positions(section, 2, 10)  # wrong k
    with pytest.raises(DiffFormatError):
        decode_positions(section[:-1], 3, 10)  # truncated
    with pytest.raises(DiffFormatError):
        decode_positions(section, 3, 8)  # position 8 outside a tensor of 8
    with pytest.raises(DiffFormatError):
        decode_positions(b"\x01", 3, 10)  # ALL with k != n


@pytest.mark.parametrize("density", [0.005, 0.01, 0.02, 0.05, 0.1])
def test_position_bits_near_the_bound(density: float) -> None:
    n = 1_000_000
    rng = np.random.default_rng(int(density * 1e4))
    k = int(n * density)
    positions = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
    section = encode_positions(positions, n)
    bound = position_bound_bits(n, k)
    assert len(section) * 8 <= 1.03 * bound, len(section) * 8 / bound
    np.testing.assert_array_equal(decode_positions(section, k, n), positions)


def test_position_bound_bits() -> None:
    assert position_bound_bits(10, 0) == pytest.approx(0.0, abs=1e-9)
    assert position_bound_bits(10, 10) == pytest.approx(0.0, abs=1e-9)
    assert position_bound_bits(10, 3) == pytest.approx(math.log2(120))
    assert position_bound_bits(64, 32) == pytest.approx(math.log2(math.comb(64, 32)))
    with pytest.raises(ValueError, match="0 <= k <= n"):
        position_bound_bits(3, 4)
