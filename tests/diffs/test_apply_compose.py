"""Apply semantics, bit for bit, and composition == chain application == file patching.

The arithmetic of :mod:`diffs.entries` is checked against independent references: torch's
IEEE conversions for the rounding, and a pure-Python implementation of the hash spec in
:mod:`diffs.hashing`. Chains of 1..5 diffs of every kind are then applied three ways --
:func:`~diffs.chain.apply_chain` in memory, :func:`~diffs.compose.compose` then apply, and
:func:`~diffs.patch_file.apply_to_file` on files -- and must agree bit for bit.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffs.chain import Update, apply_chain
from diffs.compose import compose
from diffs.container import Diff, DiffReader, EncodeOptions, diff_bytes, write_diff
from diffs.digest import file_digest, model_digest
from diffs.dtypes import DType, bf16_to_f32, f32_to_bf16, from_compute
from diffs.entries import (
    AddEntry,
    ExactEntry,
    HashedEntry,
    RemoveEntry,
    ReplaceEntry,
    SparseEntry,
    apply_entry,
)
from diffs.errors import BaseMismatchError, IncompatibleModelError, TargetMismatchError
from diffs.hashing import CHUNK, bucket_and_sign
from diffs.make import make_exact, make_hashed, make_sparse
from diffs.model import Model, ModelFile, Tensor, load_model, save_model
from diffs.patch_file import apply_to_file
from diffs.values import ValueFormat, Values
from tests.diffs import (
    ALL_DTYPES,
    FLOAT_DTYPES,
    assert_same_model,
    perturb,
    random_bits_tensor,
    random_tensor,
)

FAST = EncodeOptions(zstd_level=3)
# Adding past the largest finite value of a dtype gives infinity, as IEEE 754 defines.
OVERFLOW_OK = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
WRONG = "sha256:" + "1" * 64

# ---------------------------------------------------------------------------------------
# independent references


def _torch_widen(stored: npt.NDArray[Any], dtype: DType) -> torch.Tensor:
    """The stored elements in their compute type, by torch's conversions."""
    t = torch.from_numpy(np.ascontiguousarray(stored).copy())
    if dtype is DType.BF16:
        return t.view(torch.int16).view(torch.bfloat16).to(torch.float32)
    if dtype is DType.F64:
        return t
    return t.to(torch.float32)


def _torch_round(values: torch.Tensor, dtype: DType) -> npt.NDArray[Any]:
    """Compute-type values rounded to ``dtype``'s storage by torch (nearest, ties to even)."""
    if dtype is DType.BF16:
        return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if dtype is DType.F16:
        return values.to(torch.float16).numpy()
    return values.numpy()


def _torch_delta(values: Values) -> torch.Tensor:
    """The binary32 deltas as :mod:`diffs.values` defines each format."""
    data = torch.from_numpy(np.ascontiguousarray(values.data).copy())
    if values.format is ValueFormat.F32:
        return data
    if values.format is ValueFormat.F16:
        return data.to(torch.float32)
    if values.format is ValueFormat.BF16:
        return data.view(torch.int16).view(torch.bfloat16).to(torch.float32)
    assert values.scale is not None
    return data.to(torch.float32) * torch.tensor(values.scale, dtype=torch.float32)


_MASK64 = 2**64 - 1


def py_bucket_and_sign(seed: int, index: int, buckets: int) -> tuple[int, bool]:
    """The map of :mod:`diffs.hashing`, written from its docstring in plain integers."""
    x = (seed ^ (index * 0x9E3779B97F4A7C15)) & _MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return ((x >> 32) * buckets) >> 32, (x & 1) == 1


def _finite_bits(rng: np.random.Generator, dtype: DType, count: int) -> npt.NDArray[Any]:
    """Random finite elements of a float dtype (any exponent: subnormals to the max)."""
    bits = random_bits_tensor(rng, dtype, (count,)).array.view(dtype.bits).copy()
    stored = bits.view(dtype.storage)
    nonfinite = ~np.isfinite(bf16_to_f32(stored) if dtype is DType.BF16 else stored)
    bits[nonfinite] ^= dtype.bits.type(1) << (8 * dtype.itemsize - 2)  # exponent's top bit
    return stored


_FORMAT_DTYPE = {
    ValueFormat.F32: DType.F32,
    ValueFormat.F16: DType.F16,
    ValueFormat.BF16: DType.BF16,
}


def _float_array(rng: np.random.Generator, dtype: DType, count: int, style: str) -> Any:
    if style == "bits":
        return _finite_bits(rng, dtype, count)
    return random_tensor(rng, dtype, (count,)).array


# ---------------------------------------------------------------------------------------
# conversions


def _torch_bf16_bits(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    converted = torch.from_numpy(values.copy()).to(torch.bfloat16)
    return converted.view(torch.int16).numpy().view(np.uint16)


def test_f32_to_bf16_matches_torch_on_finite_values_and_ties() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)
    high = rng.integers(0, 2**16, 20_000, dtype=np.uint32)
    ties = (high << 16) | 0x8000  # exactly half way: must go to the even neighbour
    near = np.concatenate([(high << 16) | 0x7FFF, (high << 16) | 0x8001, high << 16])
    special = np.array(
        [0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x00000001, 0x80000001, 0x007FFFFF, 0, 0x80000000],
        dtype=np.uint32,
    )
    values = np.concatenate([bits, ties, near, special]).view(np.float32)
    values = values[np.isfinite(values)]
    np.testing.assert_array_equal(f32_to_bf16(values), _torch_bf16_bits(values))
    # a tie goes to the neighbour whose last bit is 0
    tie_values = ties.view(np.float32)[np.isfinite(ties.view(np.float32))]
    assert np.all((f32_to_bf16(tie_values) & 1) == 0)


def test_f32_to_bf16_overflow_and_nan() -> None:
    big = np.array([3.4e38, -3.4e38, np.inf, -np.inf], dtype=np.float32)
    np.testing.assert_array_equal(f32_to_bf16(big), [0x7F80, 0xFF80, 0x7F80, 0xFF80])
    rng = np.random.default_rng(1)
    payload = rng.integers(1, 2**23, 10_000, dtype=np.uint32)
    sign = rng.integers(0, 2, 10_000, dtype=np.uint32) << 31
    nans = (sign | 0x7F800000 | payload).view(np.float32)
    out = f32_to_bf16(nans)
    assert np.all(np.isnan(bf16_to_f32(out)))  # NaN stays NaN, even a low-payload one
    np.testing.assert_array_equal(out >> 15, sign >> 31)  # sign kept
    assert np.all(out & 0x0040)  # quiet bit set


def test_bf16_to_f32_is_exact_for_every_pattern() -> None:
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    ours = bf16_to_f32(every).view(np.uint32)
    theirs = (
        torch.from_numpy(every.view(np.int16).copy())
        .view(torch.bfloat16)
        .to(torch.float32)
        .numpy()
        .view(np.uint32)
    )
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, every.astype(np.uint32) << 16)
    # narrowing a widened value gives it back (a NaN comes back quiet)
    nan = np.isnan(bf16_to_f32(every))
    back = f32_to_bf16(bf16_to_f32(every))
    np.testing.assert_array_equal(back[~nan], every[~nan])
    np.testing.assert_array_equal(back[nan], every[nan] | 0x0040)


@OVERFLOW_OK
def test_f16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(2)
    values = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = values[np.isfinite(values)]
    ours = from_compute(values, DType.F16)
    theirs = torch.from_numpy(values.copy()).to(torch.float16).numpy()
    np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16))


# ---------------------------------------------------------------------------------------
# sparse, hashed and exact arithmetic


@OVERFLOW_OK
@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    fmt=st.sampled_from(list(ValueFormat)),
    n=st.integers(1, 200),
    style=st.sampled_from(["bits", "normal"]),
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(2**-30, 2**10, width=32),
)
def test_sparse_add_is_the_documented_arithmetic(
    dtype: DType, fmt: ValueFormat, n: int, style: str, seed: int, scale: float
) -> None:
    rng = np.random.default_rng(seed)
    stored = _float_array(rng, dtype, n, style)
    positions = np.flatnonzero(rng.random(n) < 0.5).astype(np.int64)
    k = positions.size
    if fmt is ValueFormat.I8:
        values = Values(fmt, rng.integers(-128, 128, k).astype(np.int8), scale)
    elif style == "bits":
        values = Values(fmt, _finite_bits(rng, _FORMAT_DTYPE[fmt], k))
    else:
        values = Values.quantize(rng.standard_normal(k) * 0.01, fmt)
    entry = SparseEntry("w", dtype, (n,), positions, values)
    result = apply_entry(Tensor(dtype, stored), entry)
    assert result is not None
    assert result.dtype is dtype
    assert result.shape == (n,)

    expected = stored.copy()
    wide = _torch_widen(stored[positions], dtype) + _torch_delta(values).to(
        torch.float64 if dtype is DType.F64 else torch.float32
    )
    expected[positions] = _torch_round(wide, dtype)
    assert result.array.tobytes() == expected.tobytes()
    untouched = np.setdiff1d(np.arange(n), positions)
    assert result.array[untouched].tobytes() == stored[untouched].tobytes()


@OVERFLOW_OK
def test_f16_sparse_add_is_computed_in_float32() -> None:
    """For F16, w' = float16(float32(w) + float32(v)): the sum is rounded to binary32 first."""
    w = np.array([1.0, 65504.0, 2.0**-24, -0.0, 1.0, 1000.0, 1.0], dtype=np.float16)
    v = np.array(
        [2.0**-11, 32.0, 2.0**-26, 0.0, 2.0**-11 + 2.0**-20, 0.49, 2.0**-11 + 2.0**-34],
        dtype=np.float32,
    )
    entry = SparseEntry("w", DType.F16, (7,), np.arange(7), Values(ValueFormat.F32, v))
    result = apply_entry(Tensor.of(w), entry)
    assert result is not None
    expected = (w.astype(np.float32) + v).astype(np.float16)
    assert result.array.tobytes() == expected.tobytes()
    assert result.array[0] == 1.0  # 1 + 2**-11 is half way between 1 and 1 + 2**-10: even
    assert np.isposinf(result.array[1])  # past the largest half
    assert result.array[2] == np.float16(2.0**-24)  # subnormal, rounded down
    assert result.array[3:4].view(np.uint16)[0] == 0  # -0 + 0 is +0
    assert result.array[4] == np.float16(1.0 + 2.0**-10)  # a hair above the tie
    assert result.array[5] == np.float16(1000.5)
    # 1 + 2**-11 + 2**-34 is a hair above the tie, but binary32 rounds the sum to the tie
    # itself (its step at 1 is 2**-23), which then goes to even: 1. Rounding the exact sum
    # (in binary64, say) would give 1 + 2**-10 -- a different model on another machine.
    assert result.array[6] == 1.0
    assert result.array.tobytes() == (
        (torch.from_numpy(w).float() + torch.from_numpy(v)).half().numpy().tobytes()
    )


def test_bf16_sparse_add_rounds_to_nearest_even() -> None:
    w = f32_to_bf16(np.array([1.0, 1.0, 3.0, -2.0, 1.0], dtype=np.float32))
    v = np.array(
        [2.0**-8, 2.0**-8 + 2.0**-16, 2.0**-7, -(2.0**-7), 2.0**-8 + 2.0**-31], dtype=np.float32
    )
    entry = SparseEntry("w", DType.BF16, (5,), np.arange(5), Values(ValueFormat.F32, v))
    result = apply_entry(Tensor(DType.BF16, w), entry)
    assert result is not None
    got = bf16_to_f32(result.array)
    # 1 + 2**-8 is a tie between 1 and 1 + 2**-7: to even (1); a hair above goes up
    # 3 + 2**-7 and -2 - 2**-7 are ties too (the step is 2**-6 there): both go to even
    # 1 + 2**-8 + 2**-31 rounds to the tie in binary32 first, then to even
    np.testing.assert_array_equal(got, [1.0, 1.0 + 2.0**-7, 3.0, -2.0, 1.0])
    np.testing.assert_array_equal(
        result.array, _torch_round(_torch_widen(w, DType.BF16) + torch.from_numpy(v), DType.BF16)
    )


def test_sparse_add_on_f64_is_binary64() -> None:
    w = np.array([1.0, 1e300], dtype=np.float64)
    v = np.array([2.0**-40, 1.0], dtype=np.float32)
    entry = SparseEntry("w", DType.F64, (2,), np.arange(2), Values(ValueFormat.F32, v))
    result = apply_entry(Tensor.of(w), entry)
    assert result is not None
    np.testing.assert_array_equal(result.array, w + v.astype(np.float64))
    assert result.array[0] != 1.0  # not rounded through binary32


@pytest.mark.parametrize(
    ("seed", "buckets"),
    [(0, 1), (0, 2), (1, 3), (42, 1000), (2**63, 2**31), (2**64 - 1, 2**32 - 1), (12345, 7)],
)
@pytest.mark.parametrize("start", [0, 1000, 2**32 - 40, 2**40])
def test_bucket_and_sign_matches_the_spec(seed: int, buckets: int, start: int) -> None:
    bucket, negative = bucket_and_sign(seed, start, start + 64, buckets)
    assert bucket.dtype == np.int64
    assert negative.dtype == np.bool_
    for offset in range(64):
        want_bucket, want_negative = py_bucket_and_sign(seed, start + offset, buckets)
        assert int(bucket[offset]) == want_bucket
        assert bool(negative[offset]) == want_negative
        assert 0 <= want_bucket < buckets


def test_hash_is_the_splitmix64_finalizer() -> None:
    """Seed 0, index i is SplitMix64's i-th output: its published first three values."""
    known = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    bucket, negative = bucket_and_sign(0, 1, 4, 2**32 - 1)
    for i, x in enumerate(known):
        assert int(bucket[i]) == ((x >> 32) * (2**32 - 1)) >> 32
        assert bool(negative[i]) == bool(x & 1)


@settings(max_examples=50, deadline=None)
@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    fmt=st.sampled_from(list(ValueFormat)),
    n=st.integers(1, 150),
    k=st.integers(1, 40),
    seed=st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_hashed_add_is_the_documented_arithmetic(
    dtype: DType, fmt: ValueFormat, n: int, k: int, seed: int, data_seed: int
) -> None:
    rng = np.random.default_rng(data_seed)
    stored = random_tensor(rng, dtype, (n,)).array
    buckets = Values.quantize(rng.standard_normal(k) * 0.1, fmt)
    entry = HashedEntry("h", dtype, (n,), seed, buckets)
    result = apply_entry(Tensor(dtype, stored), entry)
    assert result is not None

    table = _torch_delta(buckets)
    deltas = torch.empty(n, dtype=torch.float32)
    for i in range(n):
        b, negative = py_bucket_and_sign(seed, i, k)
        deltas[i] = -table[b] if negative else table[b]
    wide = _torch_widen(stored, dtype) + deltas.to(_torch_widen(stored, dtype).dtype)
    assert result.array.tobytes() == _torch_round(wide, dtype).tobytes()


@pytest.mark.parametrize(
    ("dtype", "step"), [(DType.F16, 2.0**-11), (DType.BF16, 2.0**-8)], ids=["F16", "BF16"]
)
def test_hashed_add_is_computed_in_float32(dtype: DType, step: float) -> None:
    """w + b with b a hair above half a step: binary32 rounds to the tie, then to even."""
    table = np.array([step + step * 2.0**-23], dtype=np.float32)  # exact in binary32
    ones = np.ones(16, np.float32)
    stored = f32_to_bf16(ones) if dtype is DType.BF16 else ones.astype(np.float16)
    entry = HashedEntry("h", dtype, (16,), 5, Values(ValueFormat.F32, table))
    result = apply_entry(Tensor(dtype, stored), entry)
    assert result is not None
    _, negative = bucket_and_sign(5, 0, 16, 1)
    assert negative.any()
    assert not negative.all()
    got = bf16_to_f32(result.array) if dtype is DType.BF16 else result.array.astype(np.float32)
    np.testing.assert_array_equal(got, np.where(negative, 1.0 - step, 1.0))


def test_hashed_add_is_the_same_across_chunks() -> None:
    """The map is per element: chunked application equals one pass over all indices."""
    n = CHUNK + 1000
    seed, k = 0xDEADBEEF, 97
    table = np.linspace(-1, 1, k).astype(np.float32)
    entry = HashedEntry("h", DType.F32, (n,), seed, Values(ValueFormat.F32, table))
    result = apply_entry(Tensor.of(np.zeros(n, np.float32)), entry)
    assert result is not None
    bucket, negative = bucket_and_sign(seed, 0, n, k)
    np.testing.assert_array_equal(result.array, np.where(negative, -table[bucket], table[bucket]))
    for i in (0, CHUNK - 1, CHUNK, CHUNK + 1, n - 1):
        b, neg = py_bucket_and_sign(seed, i, k)
        assert result.array[i] == (-table[b] if neg else table[b])


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(ALL_DTYPES),
    n=st.integers(1, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_xor_on_every_dtype(dtype: DType, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = random_bits_tensor(rng, dtype, (n,))
    target = random_bits_tensor(rng, dtype, (n,))
    positions = np.flatnonzero(rng.random(n) < 0.6).astype(np.int64)
    a = base.array.view(dtype.bits)
    b = target.array.view(dtype.bits)
    entry = ExactEntry("x", dtype, (n,), positions, a[positions] ^ b[positions])
    result = apply_entry(base, entry)
    assert result is not None
    expected = a.copy()
    expected[positions] = b[positions]
    assert result.array.view(dtype.bits).tobytes() == expected.tobytes()
    assert base.array.view(dtype.bits).tobytes() == a.tobytes()  # the input is not modified


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_make_exact_is_lossless_bit_for_bit(seed: int) -> None:
    """NaN payloads, -0.0, signalling NaNs, BOOL, added/removed/reshaped tensors."""
    rng = np.random.default_rng(seed)
    dtypes = list(rng.choice(ALL_DTYPES, 5))
    base = {
        f"t{i}": random_bits_tensor(rng, dt, (int(rng.integers(0, 30)),))
        for i, dt in enumerate(dtypes)
    }
    target = {name: perturb(rng, t, 0.3) if rng.random() < 0.7 else t for name, t in base.items()}
    if rng.random() < 0.5:
        target.pop("t0")
    if rng.random() < 0.5:
        target["new"] = random_bits_tensor(rng, DType.BF16, (3, 2))
    if rng.random() < 0.5:
        target["t1"] = random_bits_tensor(rng, DType.F16, (2, 2))
    diff = make_exact(base, target)
    assert diff.base_digest == model_digest(base)
    assert diff.target_digest == model_digest(target)
    assert_same_model(apply_chain(base, [diff]), target)
    assert_same_model(apply_chain(base, [_reread(diff)]), target)


def test_make_exact_of_identical_models_is_empty() -> None:
    rng = np.random.default_rng(5)
    model = {"a": random_tensor(rng, DType.F32, (3, 3))}
    diff = make_exact(model, dict(model))
    assert list(diff.entries) == []
    assert diff.base_digest == diff.target_digest


def _reread(diff: Diff) -> Diff:
    with DiffReader(diff_bytes(diff, FAST)) as reader:
        return reader.read()


# ---------------------------------------------------------------------------------------
# chains: apply_chain == compose == apply_to_file

BASE_SPEC: dict[str, tuple[DType, tuple[int, ...]]] = {
    "enc.0.weight": (DType.F32, (12, 10)),
    "enc.0.bias": (DType.F16, (10,)),
    "enc.1.weight": (DType.BF16, (8, 6)),
    "dec.weight": (DType.F64, (5, 4)),
    "dec.steps": (DType.I32, (4,)),
    "embed": (DType.F16, (40,)),
    "mask": (DType.BOOL, (7,)),
}
OPS = ("exact", "sparse", "hashed", "add", "remove", "replace")
IN_PLACE_OPS = ("exact", "sparse", "hashed")


def make_base(rng: np.random.Generator) -> dict[str, Tensor]:
    return {name: random_tensor(rng, dt, shape) for name, (dt, shape) in BASE_SPEC.items()}


def next_diff(rng: np.random.Generator, model: Model, op: str, step: int) -> Diff:
    """A diff of kind ``op`` from ``model`` (made by diffs.make from a perturbed model)."""
    floats = [n for n, t in model.items() if t.dtype.is_float]
    fmt = list(ValueFormat)[int(rng.integers(0, 4))]
    if op in ("sparse", "hashed") and floats:
        target = dict(model)
        for name in floats:
            target[name] = perturb(rng, model[name], 0.5, scale=0.1)
        budget = int(rng.integers(300, 2500))
        if op == "sparse":
            diff, _ = make_sparse(model, target, budget, fmt, options=FAST)
        else:
            seed = int(rng.integers(0, 2**63))
            diff, _ = make_hashed(model, target, budget, fmt, seed=seed, options=FAST)
        return diff
    target = dict(model)
    names = sorted(model)
    if op == "add" or (op in ("remove", "replace") and len(names) < 3):
        dtype = ALL_DTYPES[int(rng.integers(0, len(ALL_DTYPES)))]
        target[f"added.{step}"] = random_tensor(rng, dtype, (int(rng.integers(0, 6)), 3))
    elif op == "remove":
        target.pop(names[int(rng.integers(0, len(names)))])
    elif op == "replace":
        name = names[int(rng.integers(0, len(names)))]
        old = model[name]
        numel = int(np.prod(old.shape))
        new_shape = (numel,) if len(old.shape) != 1 else (1, numel)  # a reshape...
        dtype = old.dtype
        if rng.random() < 0.5:  # ...and maybe a new dtype
            dtype = DType.F16 if old.dtype is DType.F32 else DType.F32
        target[name] = random_tensor(rng, dtype, new_shape)
    else:
        for name in names:
            target[name] = perturb(rng, model[name], 0.3)
    return make_exact(model, target)


def build_chain(seed: int, ops: Sequence[str]) -> tuple[dict[str, Tensor], list[Diff], list[Model]]:
    rng = np.random.default_rng(seed)
    base = make_base(rng)
    chain: list[Diff] = []
    models: list[Model] = [base]
    for step, op in enumerate(ops):
        diff = next_diff(rng, models[-1], op, step)
        chain.append(diff)
        models.append(apply_chain(models[-1], [diff]))  # checks the declared target too
    return base, chain, models


def _composed_kinds_are_exact(diff: Diff) -> None:
    for entry in diff.entries:
        assert isinstance(entry, ExactEntry | AddEntry | RemoveEntry | ReplaceEntry)


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
)
def test_compose_equals_chain_equals_file_patch(ops: list[str], seed: int) -> None:
    base, chain, models = build_chain(seed, ops)
    final = apply_chain(base, chain)
    assert_same_model(final, models[-1])
    assert model_digest(final) == chain[-1].target_digest

    composed = compose(base, chain)
    _composed_kinds_are_exact(composed)
    assert composed.base_digest == model_digest(base)
    assert composed.target_digest == chain[-1].target_digest
    assert_same_model(apply_chain(base, [composed]), final)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_path = root / "base.safetensors"
        save_model(base_path, base, {"producer": "tests"})
        before = base_path.read_bytes()
        paths = []
        for number, diff in enumerate(chain):
            paths.append(root / f"{number}.diff")
            write_diff(paths[-1], diff, FAST)
        composed_path = root / "composed.diff"
        write_diff(composed_path, composed, FAST)

        readers = [DiffReader(p) for p in paths]
        try:
            # the chain, read back from files, composes to the very same bytes
            with ModelFile(base_path) as mf:
                assert diff_bytes(compose(mf, readers), FAST) == composed_path.read_bytes()
            out = root / "out.safetensors"
            assert apply_to_file(base_path, readers, out) == chain[-1].target_digest
        finally:
            for reader in readers:
                reader.close()
        assert_same_model(load_model(out), final)
        assert file_digest(out) == chain[-1].target_digest

        out2 = root / "out2.safetensors"
        with DiffReader(composed_path) as reader:
            apply_to_file(base_path, [reader], out2)
        assert_same_model(load_model(out2), final)

        out3 = root / "out3.safetensors"
        apply_to_file(base_path, chain, out3)  # in-memory diffs work as well
        assert_same_model(load_model(out3), final)

        assert base_path.read_bytes() == before  # the base is never modified
        expected = sorted(
            ["base.safetensors", "composed.diff", "out.safetensors", "out2.safetensors"]
            + ["out3.safetensors"]
            + [p.name for p in paths]
        )
        assert _listing(root) == expected  # no temporary files left behind

        if all(op in IN_PLACE_OPS for op in ops):
            # patched in place: the layout (header, metadata) of the base is kept
            with ModelFile(base_path) as b, ModelFile(out) as o:
                assert o.metadata == b.metadata == {"producer": "tests"}
                assert o.header.data_start == b.header.data_start
            head = before[: 8 + int.from_bytes(before[:8], "little")]
            assert out.read_bytes()[: len(head)] == head


def _save_chain(root: Path, base: Model, chain: Sequence[Diff]) -> tuple[Path, list[Path]]:
    base_path = root / "base.safetensors"
    save_model(base_path, base, {"note": "base"})
    paths = []
    for i, diff in enumerate(chain):
        paths.append(root / f"{i}.diff")
        write_diff(paths[-1], diff, FAST)
    return base_path, paths


def test_in_place_path_patches_a_copy_with_progress(tmp_path: Path) -> None:
    base, chain, models = build_chain(11, ["sparse", "hashed", "exact", "sparse"])
    assert all(
        isinstance(e, SparseEntry | HashedEntry | ExactEntry) for d in chain for e in d.entries
    )
    kinds = {type(e) for d in chain for e in d.entries}
    assert kinds == {SparseEntry, HashedEntry, ExactEntry}
    base_path, paths = _save_chain(tmp_path, base, chain)
    before = base_path.read_bytes()
    calls: list[tuple[int, int]] = []
    out = tmp_path / "out.safetensors"
    readers = [DiffReader(p) for p in paths]
    try:
        apply_to_file(base_path, readers, out, progress=lambda d, t: calls.append((d, t)))
    finally:
        for r in readers:
            r.close()
    assert_same_model(load_model(out), models[-1])
    total = sum(len(d.entries) for d in chain)
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == list(range(1, total + 1))
    assert base_path.read_bytes() == before
    assert len(out.read_bytes()) == len(before)
    with ModelFile(out) as mf:
        assert mf.metadata == {"note": "base"}  # the base's own layout, patched


def test_rewrite_path_adds_removes_and_reshapes(tmp_path: Path) -> None:
    base, chain, models = build_chain(12, ["add", "sparse", "remove", "replace", "exact"])
    kinds = {type(e) for d in chain for e in d.entries}
    assert {AddEntry, RemoveEntry, ReplaceEntry} <= kinds
    base_path, paths = _save_chain(tmp_path, base, chain)
    before = base_path.read_bytes()
    out = tmp_path / "out.safetensors"
    readers = [DiffReader(p) for p in paths]
    try:
        assert apply_to_file(base_path, readers, out) == chain[-1].target_digest
    finally:
        for r in readers:
            r.close()
    assert_same_model(load_model(out), models[-1])

    def layout(model: Model) -> set[tuple[str, DType, tuple[int, ...]]]:
        return {(name, t.dtype, t.shape) for name, t in model.items()}

    assert layout(load_model(out)) != layout(base)
    assert base_path.read_bytes() == before
    assert _listing(tmp_path) == sorted(
        ["base.safetensors", "out.safetensors", *[p.name for p in paths]]
    )


def test_rewrite_output_is_a_valid_safetensors_file(tmp_path: Path) -> None:
    from safetensors import safe_open

    base, chain, models = build_chain(13, ["add", "replace"])
    base_path, _ = _save_chain(tmp_path, base, chain)
    out = tmp_path / "out.safetensors"
    apply_to_file(base_path, chain, out)
    with safe_open(str(out), framework="pt") as f:
        assert sorted(f.keys()) == sorted(models[-1])
        for name in sorted(f.keys()):
            loaded = f.get_tensor(name)
            want = models[-1][name]
            assert tuple(loaded.shape) == want.shape
            assert loaded.reshape(-1).view(torch.uint8).numpy().tobytes() == want.layout_bytes


# ---------------------------------------------------------------------------------------
# digest errors leave nothing behind


def _exact_and_rewrite_diffs(rng: np.random.Generator, base: Model) -> dict[str, Diff]:
    in_place = next_diff(rng, base, "exact", 0)
    rewrite = next_diff(rng, base, "add", 1)
    assert in_place.entries
    assert all(isinstance(e, ExactEntry) for e in in_place.entries)
    assert any(isinstance(e, AddEntry) for e in rewrite.entries)
    return {"in_place": in_place, "rewrite": rewrite}


@pytest.mark.parametrize("path_kind", ["in_place", "rewrite"])
@pytest.mark.parametrize("from_file", [False, True])
def test_wrong_base_raises_and_writes_nothing(
    tmp_path: Path, path_kind: str, from_file: bool
) -> None:
    rng = np.random.default_rng(21)
    base = make_base(rng)
    diff = _exact_and_rewrite_diffs(rng, base)[path_kind]
    other = {name: perturb(rng, t, 0.5) for name, t in base.items()}
    other_path = tmp_path / "other.safetensors"
    save_model(other_path, other)
    before = other_path.read_bytes()
    update: Update = diff
    if from_file:
        write_diff(tmp_path / "d.diff", diff)
        update = DiffReader(tmp_path / "d.diff")
    listing = _listing(tmp_path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(BaseMismatchError) as info:
        apply_to_file(other_path, [update], out)
    assert info.value.expected == diff.base_digest
    assert info.value.actual == model_digest(other)
    assert not out.exists()
    assert _listing(tmp_path) == listing
    assert other_path.read_bytes() == before
    with pytest.raises(BaseMismatchError):
        apply_chain(other, [update])
    with pytest.raises(BaseMismatchError):
        compose(other, [update])


@pytest.mark.parametrize("path_kind", ["in_place", "rewrite"])
@pytest.mark.parametrize("from_file", [False, True])
def test_wrong_declared_target_raises_and_writes_nothing(
    tmp_path: Path, path_kind: str, from_file: bool
) -> None:
    rng = np.random.default_rng(22)
    base = make_base(rng)
    good = _exact_and_rewrite_diffs(rng, base)[path_kind]
    bad = Diff(good.base_digest, WRONG, good.entries, good.info)
    base_path = tmp_path / "base.safetensors"
    save_model(base_path, base)
    before = base_path.read_bytes()
    update: Update = bad
    if from_file:
        write_diff(tmp_path / "bad.diff", bad)
        update = DiffReader(tmp_path / "bad.diff")
    listing = _listing(tmp_path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(TargetMismatchError) as info:
        apply_to_file(base_path, [update], out)
    assert info.value.expected == WRONG
    assert info.value.actual == good.target_digest
    assert not out.exists()
    assert _listing(tmp_path) == listing  # no temporary file either
    assert base_path.read_bytes() == before
    with pytest.raises(TargetMismatchError):
        apply_chain(base, [update])
    with pytest.raises(TargetMismatchError):
        compose(base, [update])


@pytest.mark.parametrize("second", ["exact", "add"])
def test_wrong_intermediate_target_is_caught(tmp_path: Path, second: str) -> None:
    """Diff 1 lies about its target; diff 2 links to the lie: step 1's check fails."""
    rng = np.random.default_rng(23)
    base = make_base(rng)
    d1 = next_diff(rng, base, "exact", 0)
    middle = apply_chain(base, [d1])
    d2 = next_diff(rng, middle, second, 1)
    lying = Diff(d1.base_digest, WRONG, d1.entries)
    linked = Diff(WRONG, d2.target_digest, d2.entries)
    base_path = tmp_path / "base.safetensors"
    save_model(base_path, base)
    out = tmp_path / "out.safetensors"
    with pytest.raises(TargetMismatchError, match="diff 1 of the chain"):
        apply_to_file(base_path, [lying, linked], out)
    assert not out.exists()
    with pytest.raises(TargetMismatchError, match="diff 1 of the chain"):
        apply_chain(base, [lying, linked])
    with pytest.raises(TargetMismatchError):
        compose(base, [lying, linked])


def test_broken_chain_link_is_a_base_mismatch(tmp_path: Path) -> None:
    rng = np.random.default_rng(24)
    base = make_base(rng)
    d1 = next_diff(rng, base, "exact", 0)
    base_path = tmp_path / "base.safetensors"
    save_model(base_path, base)
    out = tmp_path / "out.safetensors"
    with pytest.raises(BaseMismatchError, match="diff 2 of the chain"):
        apply_to_file(base_path, [d1, d1], out)
    assert not out.exists()
    with pytest.raises(BaseMismatchError):
        apply_chain(base, [d1, d1])


def test_failed_apply_keeps_a_previous_output(tmp_path: Path) -> None:
    rng = np.random.default_rng(25)
    base = make_base(rng)
    diff = next_diff(rng, base, "exact", 0)
    bad = Diff(diff.base_digest, WRONG, diff.entries)
    base_path = tmp_path / "base.safetensors"
    save_model(base_path, base)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous version")
    with pytest.raises(TargetMismatchError):
        apply_to_file(base_path, [bad], out)
    assert out.read_bytes() == b"previous version"


@pytest.mark.parametrize("problem", ["missing", "shape", "dtype"])
def test_entry_that_does_not_fit_is_incompatible(tmp_path: Path, problem: str) -> None:
    rng = np.random.default_rng(26)
    base = make_base(rng)
    name, dtype, shape = "enc.0.bias", DType.F16, (10,)
    if problem == "missing":
        name = "no.such.tensor"
    elif problem == "shape":
        shape = (2, 5)
    else:
        dtype = DType.BF16
    entry = ExactEntry(name, dtype, shape, np.array([1], np.int64), np.array([1], dtype.bits))
    diff = Diff(model_digest(base), WRONG, [entry])
    base_path = tmp_path / "base.safetensors"
    save_model(base_path, base)
    out = tmp_path / "out.safetensors"
    with pytest.raises(IncompatibleModelError):
        apply_to_file(base_path, [diff], out)
    assert _listing(tmp_path) == ["base.safetensors"]
    with pytest.raises(IncompatibleModelError):
        apply_chain(base, [diff])


def test_add_of_an_existing_tensor_is_incompatible() -> None:
    base = make_base(np.random.default_rng(27))
    diff = Diff(model_digest(base), WRONG, [AddEntry("mask", base["mask"])])
    with pytest.raises(IncompatibleModelError):
        apply_chain(base, [diff])


def test_empty_chain_is_refused(tmp_path: Path) -> None:
    base = make_base(np.random.default_rng(28))
    with pytest.raises(ValueError, match="at least one"):
        compose(base, [])
    base_path = tmp_path / "base.safetensors"
    save_model(base_path, base)
    with pytest.raises(ValueError, match="empty chain"):
        apply_to_file(base_path, [], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
