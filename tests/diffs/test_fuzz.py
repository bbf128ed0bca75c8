"""Mutation fuzzing of diff and model files: a named error or a deterministic result, fast.

Valid files (from ``test_hostile``) are mutated at the byte level (flips, insertions,
deletions, truncations, overwrites with interesting bytes) and at the structure level
(a JSON value anywhere in the safetensors header or the manifest replaced, dropped or
added), then opened, decoded and applied. The only outcomes allowed are a
:class:`~diffs.errors.DiffError` subclass or success -- and a success must be the
declared target, the same on a second run. Every example must finish within a second.

The default run is short (a few hundred examples, derandomized so CI is repeatable);
the ``slow`` variants (``make test-slow``) draw many more at random.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffs.chain import apply_chain
from diffs.container import DiffReader
from diffs.digest import file_digest, model_digest
from diffs.entries import Entry, HashedEntry, SparseEntry
from diffs.errors import DiffError, LimitExceededError, ModelFormatError
from diffs.limits import DecodeLimits
from diffs.model import ModelFile, load_model, save_model
from diffs.patch_file import apply_to_file
from diffs.safetensors_file import METADATA_KEY, parse_header
from tests.diffs.test_hostile import Parts, fixtures, pack, unpack, zstd_frame

PER_EXAMPLE = timedelta(seconds=1)
FAST = settings(
    max_examples=200,
    deadline=PER_EXAMPLE,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(
    max_examples=5000,
    deadline=PER_EXAMPLE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMITS = DecodeLimits(max_decoded_bytes=1 << 28)
"""Caps small enough that no mutated size can make an example slow, large enough for all
the valid files."""

# --------------------------------------------------------------------------- mutations

INTERESTING_BYTES = [0x00, 0x01, 0x7F, 0x80, 0xFF, ord("["), ord("{"), ord('"'), ord("9")]

Mutation = tuple[Any, ...]


def byte_mutation() -> st.SearchStrategy[Mutation]:
    """One edit; positions are reduced modulo the current length when applied."""
    where = st.integers(0, 1 << 20)
    return st.one_of(
        st.tuples(st.just("flip"), where, st.integers(1, 255)),
        st.tuples(st.just("set"), where, st.sampled_from(INTERESTING_BYTES)),
        st.tuples(st.just("insert"), where, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), where, st.integers(1, 16)),
        st.tuples(st.just("truncate"), where),
        st.tuples(st.just("u64"), where, st.sampled_from([0, 1, 2**31, 2**32, 2**63, 2**64 - 1])),
    )


def apply_bytes(data: bytes, mutations: list[Mutation], region: str = "all") -> bytes:
    """``data`` with each mutation applied in turn, aimed at the header, the buffer or all."""
    out = bytearray(data)
    header_end = 8 + int.from_bytes(data[:8], "little") if len(data) >= 8 else len(data)
    for mutation in mutations:
        op, where = mutation[0], mutation[1]
        low, high = {
            "header": (0, header_end),
            "buffer": (header_end, len(out)),
        }.get(region, (0, len(out)))
        if high <= low:
            low, high = 0, len(out)
        at = low + where % max(high - low, 1)
        if op == "flip" and at < len(out):
            out[at] ^= mutation[2]
        elif op == "set" and at < len(out):
            out[at] = mutation[2]
        elif op == "insert":
            out[at:at] = mutation[2]
        elif op == "delete":
            del out[at : at + mutation[2]]
        elif op == "truncate":
            del out[at:]
        elif op == "u64":
            out[at : at + 8] = mutation[2].to_bytes(8, "little")
    return bytes(out)


def in_place_mutation() -> st.SearchStrategy[Mutation]:
    """Edits that keep the length (so the buffer still tiles and the streams are reached)."""
    where = st.integers(0, 1 << 20)
    return st.one_of(
        st.tuples(st.just("flip"), where, st.integers(1, 255)),
        st.tuples(st.just("set"), where, st.sampled_from(INTERESTING_BYTES)),
    )


def mutate_section(blob: bytes, which: int, mutations: list[Mutation]) -> bytes:
    """One section's bytes edited (any length), the header re-tiled to fit."""
    parts = Parts.of(blob)
    if not parts.sections:
        return blob
    name = sorted(parts.sections)[which % len(parts.sections)]
    parts.sections[name] = apply_bytes(parts.sections[name], mutations)
    return parts.build()


INTERESTING_VALUES: list[Any] = [
    0,
    1,
    -1,
    7,
    8,
    255,
    256,
    2**31,
    2**32,
    2**33,
    2**62,
    2**63,
    2**64,
    -(2**63),
    10**400,
    0.5,
    1e308,
    float("nan"),
    float("inf"),
    True,
    False,
    None,
    "",
    "x",
    "\ud800",
    "F32",
    "F16",
    "BF16",
    "I64",
    "U8",
    "BOOL",
    "raw",
    "zstd",
    "shuffle",
    "f16",
    "i8",
    "sparse",
    "hashed",
    "exact",
    "replace",
    "add",
    "remove",
    "sha256:" + "0" * 64,
    [],
    {},
    [0],
    [2**31, 2**31],
    [0, 2**70],
    [1] * 9,
    {"format": "i8", "codec": "raw", "scale": 1.0},
]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``node`` (containers included, the root excluded)."""
    found: list[tuple[Any, ...]] = []
    items: list[tuple[Any, Any]] = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    for key, child in items:
        path = (*prefix, key)
        found.append(path)
        found += _paths(child, path)
    return found


def _document(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """The header as one tree: the manifest's ``entries`` and ``info`` decoded in place."""
    header, buffer = unpack(blob)
    metadata = header.get(METADATA_KEY, {})
    for key in ("entries", "info"):
        if key in metadata:
            metadata[key] = json.loads(metadata[key])
    return header, buffer


def _encode(header: dict[str, Any], buffer: bytes) -> bytes:
    metadata = header.get(METADATA_KEY)
    if isinstance(metadata, dict):
        for key in ("entries", "info"):
            if key in metadata and not isinstance(metadata[key], str):
                metadata[key] = json.dumps(metadata[key], separators=(",", ":"))
    return pack(header, buffer)


def json_mutation() -> st.SearchStrategy[Mutation]:
    return st.one_of(
        st.tuples(st.just("replace"), st.integers(0, 1 << 16), st.sampled_from(INTERESTING_VALUES)),
        st.tuples(st.just("drop"), st.integers(0, 1 << 16)),
        st.tuples(
            st.just("add"),
            st.integers(0, 1 << 16),
            st.sampled_from(["count", "seed", "kind", "codec", "scale", "x"]),
            st.sampled_from(INTERESTING_VALUES),
        ),
        st.tuples(st.just("int"), st.integers(0, 1 << 16), st.integers(-3, 3)),
    )


def apply_json(blob: bytes, mutations: list[Mutation], scope: tuple[str, ...] = ()) -> bytes:
    """``blob`` with values of its header tree replaced, dropped, added or nudged.

    ``scope`` restricts the edits to paths below it (e.g. the manifest's entries).
    """
    header, buffer = _document(blob)
    for mutation in mutations:
        paths = [p for p in _paths(header) if p[: len(scope)] == scope] or _paths(header)
        if not paths:
            break
        path = paths[mutation[1] % len(paths)]
        parent: Any = header
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = mutation[0]
        if op == "replace":
            parent[key] = copy.deepcopy(mutation[2])
        elif op == "drop":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[mutation[2]] = copy.deepcopy(mutation[3])
        elif op == "add" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(mutation[3]))
        elif op == "int" and isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] += mutation[2]
    return _encode(header, buffer)


@functools.cache
def seeds() -> dict[str, bytes]:
    """The valid diffs of ``test_hostile``, plus copies whose values are zstd/shuffle coded."""
    found = dict(fixtures().all_valid())
    for name, codecs in (("sparse", ("zstd", "shuffle")), ("hashed", ("shuffle", "zstd", "raw"))):
        parts = Parts.of(found[name])
        with DiffReader(found[name]) as reader:
            values = [_values_of(reader.entry(i)) for i in range(len(reader.specs))]
        for index, codec in enumerate(codecs):
            section = f"e{index}.values"
            if section in parts.sections and codec != "raw":
                parts.entries[index]["values"]["codec"] = codec
                data = values[index]
                raw = data.view(np.uint8)
                if codec == "shuffle":  # all first bytes, then all second bytes, ...
                    raw = raw.reshape(-1, data.dtype.itemsize).T
                parts.sections[section] = zstd_frame(raw.tobytes())
        found[f"{name}_zstd"] = parts.build()
    return found


def _values_of(entry: Entry) -> npt.NDArray[Any]:
    """The stored values of a sparse or hashed entry, whatever codec held them."""
    assert isinstance(entry, SparseEntry | HashedEntry)
    data = entry.values.data if isinstance(entry, SparseEntry) else entry.buckets.data
    return np.ascontiguousarray(data)


SEED_NAMES = ("exact", "sparse", "sparse_i8", "hashed", "sparse_zstd", "hashed_zstd")
MUTATION_KINDS = (
    "header-bytes",
    "buffer-bytes",
    "section-bytes",
    "entries-json",
    "metadata-json",
    "any-json",
    "json+section",
)


@st.composite
def mutated_diff(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(SEED_NAMES))
    kind = draw(st.sampled_from(MUTATION_KINDS))
    blob = seeds()[name]
    if kind in ("section-bytes", "json+section"):  # first: it takes the (valid) file apart
        which = draw(st.integers(0, 63))
        blob = mutate_section(blob, which, draw(st.lists(byte_mutation(), min_size=1, max_size=4)))
    json_edits = st.lists(json_mutation(), min_size=1, max_size=3)
    if kind in ("entries-json", "json+section"):
        blob = apply_json(blob, draw(json_edits), (METADATA_KEY, "entries"))
    elif kind == "metadata-json":
        blob = apply_json(blob, draw(json_edits), (METADATA_KEY,))
    elif kind == "any-json":
        blob = apply_json(blob, draw(json_edits))
    elif kind == "header-bytes":
        blob = apply_bytes(blob, draw(st.lists(byte_mutation(), min_size=1, max_size=4)), "header")
    elif kind == "buffer-bytes":
        edits = draw(st.lists(in_place_mutation(), min_size=1, max_size=4))
        blob = apply_bytes(blob, edits, "buffer")
    return f"{name}/{kind}", blob


# --------------------------------------------------------------------------- diffs

Outcome = tuple[str, str]


def _outcome(data: bytes) -> Outcome:
    """("ok", digest of the result) or ("error", the error's class); nothing else escapes."""
    try:
        with DiffReader(data, LIMITS) as reader:
            for _ in reader:
                pass
            result = apply_chain(fixtures().base, [reader])
            target = reader.target_digest
    except DiffError as exc:
        return "error", type(exc).__name__
    digest = model_digest(result)
    assert digest == target, "a diff that applies must give its declared target"
    return "ok", digest


def check_diff(data: bytes) -> None:
    start = time.perf_counter()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # inf/NaN arithmetic of odd values
        first = _outcome(data)
        second = _outcome(data)
    assert first == second, "decoding and applying must be deterministic"
    assert time.perf_counter() - start < 2 * PER_EXAMPLE.total_seconds()


@FAST
@given(case=mutated_diff())
def test_fuzz_diff(case: tuple[str, bytes]) -> None:
    event(case[0].split("/")[1])
    check_diff(case[1])


@pytest.mark.slow
@SLOW
@given(case=mutated_diff())
def test_fuzz_diff_long(case: tuple[str, bytes]) -> None:
    check_diff(case[1])


@FAST
@given(name=st.sampled_from(SEED_NAMES), cut=st.integers(0, 1 << 16), junk=st.binary(max_size=64))
def test_fuzz_truncate_and_append(name: str, cut: int, junk: bytes) -> None:
    """A prefix of a valid diff followed by junk."""
    blob = seeds()[name]
    check_diff(blob[: cut % (len(blob) + 1)] + junk)


@FAST
@given(data=st.binary(max_size=256))
def test_fuzz_random_bytes(data: bytes) -> None:
    check_diff(data)


@FAST
@given(body=st.binary(max_size=128), buffer=st.binary(max_size=32))
def test_fuzz_random_header(body: bytes, buffer: bytes) -> None:
    """Random header bytes behind a consistent length prefix."""
    check_diff(pack(body, buffer))


def test_unmutated_seeds_apply() -> None:
    """The control: every seed is valid, so what the fuzzer finds is the mutation's doing."""
    for name in SEED_NAMES:
        assert _outcome(seeds()[name])[0] == "ok", name


def check_diff_file(data: bytes, directory: Path) -> None:
    """As a device applies: the diff memory-mapped from disk, the model patched as a file.

    Nothing but a DiffError may escape, nothing may be left at the output path on error,
    and a success must give the declared target, the same twice.
    """
    diff_path = directory / "update.diff"
    diff_path.write_bytes(data)
    base_path = directory / "base.safetensors"
    if not base_path.exists():
        base_path.write_bytes(valid_model())
    digests = []
    for attempt in range(2):
        out_path = directory / f"out{attempt}.safetensors"
        out_path.unlink(missing_ok=True)
        try:
            with DiffReader(diff_path, LIMITS) as reader:
                declared = reader.target_digest
                got = apply_to_file(base_path, [reader], out_path, limits=LIMITS)
        except DiffError as exc:
            assert not out_path.exists()
            digests.append(type(exc).__name__)
            continue
        assert got == declared == file_digest(out_path, LIMITS)
        digests.append(got)
    assert digests[0] == digests[1]
    leftovers = {p.name for p in directory.iterdir()} - {
        "base.safetensors",
        "update.diff",
        "out0.safetensors",
        "out1.safetensors",
    }
    assert not leftovers, leftovers


@settings(FAST, max_examples=100)
@given(case=mutated_diff())
def test_fuzz_diff_file(diff_dir: Path, case: tuple[str, bytes]) -> None:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        check_diff_file(case[1], diff_dir)


@pytest.mark.slow
@settings(SLOW, max_examples=2000)  # a file written and applied twice per example
@given(case=mutated_diff())
def test_fuzz_diff_file_long(diff_dir: Path, case: tuple[str, bytes]) -> None:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        check_diff_file(case[1], diff_dir)


@pytest.fixture(scope="module")
def diff_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("apply")


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@functools.cache
def valid_model() -> bytes:
    """The base model of the diff seeds as a safetensors file (with metadata)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.safetensors"
        save_model(path, fixtures().base, {"producer": "test_fuzz"})
        return path.read_bytes()


MODEL_ERRORS = (ModelFormatError, LimitExceededError)


def _model_outcome(path: Path) -> Outcome:
    try:
        with ModelFile(path, limits=LIMITS) as model:
            for name in model:
                tensor = model[name]
                np.asarray(tensor.array).tobytes()
        digest = file_digest(path, LIMITS)
        loaded = load_model(path, LIMITS)
    except MODEL_ERRORS as exc:
        return "error", type(exc).__name__
    assert model_digest(loaded) == digest
    return "ok", digest


def check_model(data: bytes, directory: Path) -> None:
    start = time.perf_counter()
    try:
        header = parse_header(io.BytesIO(data), len(data), LIMITS)
    except MODEL_ERRORS:
        header = None
    else:
        assert header.data_start <= len(data)
    path = directory / "mutated.safetensors"
    path.write_bytes(data)
    first = _model_outcome(path)
    assert (first[0] == "ok") == (header is not None), first
    assert first == _model_outcome(path)
    assert time.perf_counter() - start < 2 * PER_EXAMPLE.total_seconds()


@st.composite
def mutated_model(draw: st.DrawFn) -> bytes:
    blob = valid_model()
    if draw(st.booleans()):
        return apply_json(blob, draw(st.lists(json_mutation(), min_size=1, max_size=3)))
    region = draw(st.sampled_from(["header", "buffer"]))
    return apply_bytes(blob, draw(st.lists(byte_mutation(), min_size=1, max_size=4)), region)


@FAST
@given(data=mutated_model())
def test_fuzz_model_file(model_dir: Path, data: bytes) -> None:
    check_model(data, model_dir)


@pytest.mark.slow
@SLOW
@given(data=mutated_model())
def test_fuzz_model_file_long(model_dir: Path, data: bytes) -> None:
    check_model(data, model_dir)


@FAST
@given(data=st.binary(max_size=128))
def test_fuzz_parse_header_random(data: bytes) -> None:
    with contextlib.suppress(*MODEL_ERRORS):
        parse_header(io.BytesIO(data), len(data), LIMITS)


def test_valid_model_opens(model_dir: Path) -> None:
    path = model_dir / "valid.safetensors"
    path.write_bytes(valid_model())
    assert _model_outcome(path) == ("ok", model_digest(fixtures().base))
