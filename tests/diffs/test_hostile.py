"""Hostile diff files: every malformed, truncated or oversized file is a named error, fast.

Each case of :data:`CASES` starts from a small valid diff, breaks exactly one thing by
editing the safetensors header, the manifest or one section, and checks that opening,
decoding every entry and applying the diff raises one precise :mod:`diffs.errors` class
within a second. The helpers here (:func:`pack`, :func:`unpack`, :class:`Parts`,
:func:`rice_section`) are shared with ``test_fuzz.py``.
"""

from __future__ import annotations

import functools
import json
import struct
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

from diffs.chain import apply_chain
from diffs.container import DiffReader, diff_bytes
from diffs.digest import model_digest
from diffs.dtypes import DType, f32_to_bf16
from diffs.errors import (
    BaseMismatchError,
    DiffError,
    DiffFormatError,
    IncompatibleModelError,
    LimitExceededError,
    TargetMismatchError,
)
from diffs.limits import DEFAULT_LIMITS, DecodeLimits
from diffs.make import make_exact, make_hashed, make_sparse
from diffs.model import Model, Tensor, save_model
from diffs.patch_file import apply_to_file
from diffs.positions import decode_positions
from diffs.safetensors_file import METADATA_KEY, sort_key
from diffs.values import ValueFormat

TIME_LIMIT_S = 1.0
MEMORY_LIMIT = 64 << 20
"""Peak traced allocation allowed while rejecting a file that declares or holds far more."""

# --------------------------------------------------------------------------- models


def _f32(rng: np.random.Generator, *shape: int) -> Tensor:
    return Tensor.of(rng.standard_normal(shape).astype(np.float32))


def _bump(rng: np.random.Generator, tensor: Tensor, density: float) -> Tensor:
    flat = tensor.array.copy().reshape(-1)
    mask = rng.random(flat.size) < density
    if tensor.dtype is DType.BF16:
        flat[mask] ^= np.uint16(1)
    else:
        flat[mask] += (rng.standard_normal(int(mask.sum())) * 0.1).astype(flat.dtype)
    return Tensor(tensor.dtype, flat.reshape(tensor.shape))


@dataclass(frozen=True)
class Fixtures:
    base: dict[str, Tensor]
    other: dict[str, Tensor]
    """A model that is not the base (one element differs)."""
    exact: bytes
    """replace, exact (F32 shuffle, F16 raw, BF16 zstd, I64 raw), remove, add (raw, zstd)."""
    sparse: bytes
    """Two sparse entries, f16 values."""
    sparse_i8: bytes
    """Two sparse entries, i8 values with a scale."""
    hashed: bytes
    """Three hashed entries, seed 12345."""

    def all_valid(self) -> dict[str, bytes]:
        return {
            "exact": self.exact,
            "sparse": self.sparse,
            "sparse_i8": self.sparse_i8,
            "hashed": self.hashed,
        }


@functools.cache
def fixtures() -> Fixtures:
    rng = np.random.default_rng(20240)
    base = {
        "a.bias": _f32(rng, 24),
        "a.weight": _f32(rng, 32, 24),
        "b.emb": Tensor.of(rng.standard_normal((64, 8)).astype(np.float16)),
        "c.bf": Tensor(DType.BF16, f32_to_bf16(rng.standard_normal((16, 16)).astype(np.float32))),
        "d.steps": Tensor.of(np.arange(4, dtype=np.int64)),
        "e.old": _f32(rng, 8),
    }
    floats = dict(base)
    for name in ("a.weight", "b.emb", "c.bf"):
        floats[name] = _bump(rng, base[name], 0.2)
    exact_target = dict(floats)
    exact_target["a.bias"] = Tensor.of(base["a.bias"].array.reshape(4, 6) + 1)
    exact_target["d.steps"] = Tensor.of(np.array([0, 1, 5, 3], dtype=np.int64))
    del exact_target["e.old"]
    exact_target["f.new"] = _f32(rng, 4, 4)
    exact_target["g.zeros"] = Tensor.of(np.zeros(256, dtype=np.float32))
    other = dict(base)
    steps = base["d.steps"].array.copy()
    steps[0] = 99
    other["d.steps"] = Tensor.of(steps)
    sparse, _ = make_sparse(base, floats, 1200)
    sparse_i8, _ = make_sparse(base, floats, 1200, ValueFormat.I8)
    hashed, _ = make_hashed(base, floats, 1200, seed=12345)
    return Fixtures(
        base=base,
        other=other,
        exact=diff_bytes(make_exact(base, exact_target)),
        sparse=diff_bytes(sparse),
        sparse_i8=diff_bytes(sparse_i8),
        hashed=diff_bytes(hashed),
    )


# --------------------------------------------------------------------------- crafting


def pack(header: dict[str, Any] | bytes | str, buffer: bytes = b"") -> bytes:
    """A safetensors file: u64 LE header length, the header, the buffer (nothing checked).

    ``header`` is a dict (dumped as JSON; NaN and lone surrogates pass as JSON escapes),
    or the exact header text or bytes.
    """
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    raw = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + buffer


def unpack(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """The header dict and buffer of a well-formed safetensors file."""
    (length,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


@dataclass
class Parts:
    """A diff file taken apart: metadata, decoded entries and info, section bytes."""

    metadata: dict[str, str]
    entries: list[Any]
    sections: dict[str, bytes]
    info: Any = field(default_factory=dict)

    @classmethod
    def of(cls, blob: bytes) -> Parts:
        header, buffer = unpack(blob)
        metadata = header.pop(METADATA_KEY)
        sections = {
            name: buffer[spec["data_offsets"][0] : spec["data_offsets"][1]]
            for name, spec in header.items()
        }
        return cls(
            dict(metadata), json.loads(metadata["entries"]), sections, json.loads(metadata["info"])
        )

    def header(self) -> tuple[dict[str, Any], bytes]:
        """The safetensors header (sections tiled in canonical order) and the buffer."""
        metadata = dict(self.metadata)
        if "entries" in metadata:
            metadata["entries"] = json.dumps(self.entries, separators=(",", ":"))
        if "info" in metadata:
            metadata["info"] = json.dumps(self.info, separators=(",", ":"))
        header: dict[str, Any] = {METADATA_KEY: metadata}
        offset = 0
        buffer = b""
        for name in sorted(self.sections, key=sort_key):
            data = self.sections[name]
            header[name] = {
                "dtype": "U8",
                "shape": [len(data)],
                "data_offsets": [offset, offset + len(data)],
            }
            offset += len(data)
            buffer += data
        return header, buffer

    def build(self, tweak: Callable[[dict[str, Any]], object] | None = None) -> bytes:
        """The file; ``tweak`` may edit the header dict in place first."""
        header, buffer = self.header()
        if tweak is not None:
            tweak(header)
        return pack(header, buffer)


def pack_bits(bits: list[int]) -> bytes:
    """Bits LSB-first, zero-padded to whole bytes (the position streams' bit order)."""
    return np.packbits(np.array(bits, dtype=np.uint8), bitorder="little").tobytes()


def rice_section(
    gaps: list[int],
    params: list[int] | None = None,
    block_log2: int = 8,
    *,
    unary_nbytes: int | None = None,
    unary_bits: list[int] | None = None,
) -> bytes:
    """A RICE position section for ``gaps``, written independently of ``diffs.positions``.

    ``params`` are the blocks' Rice parameters (default all 0); ``unary_nbytes`` and
    ``unary_bits`` override the header field and the unary stream to craft defects.
    """
    block = 1 << block_log2
    nblocks = -(-len(gaps) // block)
    params = [0] * nblocks if params is None else params
    unary: list[int] = []
    remainders: list[int] = []
    for i, gap in enumerate(gaps):
        width = params[i // block]
        unary += [0] * (gap >> width) + [1]
        remainders += [(gap >> j) & 1 for j in range(width)]
    stream = pack_bits(unary if unary_bits is None else unary_bits)
    length = len(stream) if unary_nbytes is None else unary_nbytes
    head = struct.pack("<BBQ", 0, block_log2, length)
    return head + bytes(params) + stream + pack_bits(remainders)


def gaps_of(positions: list[int]) -> list[int]:
    return [p - q - 1 for p, q in zip(positions, [-1, *positions[:-1]], strict=True)]


def zstd_frame(data: bytes, *, checksum: bool = False) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_checksum=checksum).compress(data)


@functools.cache
def zstd_bomb(size: int = 1 << 30) -> bytes:
    """One Zstandard frame of ``size`` zero bytes (1 GiB -> about 32 KB), made streaming."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    zeros = bytes(1 << 22)
    out = [compressor.compress(zeros) for _ in range(size // len(zeros))]
    out.append(compressor.flush())
    return b"".join(out)


# The tensor every crafted position case targets: a.weight, F32 [32, 24] (n = 768).
N = 32 * 24


def exact_entry_parts(
    positions_section: bytes, count: int, xor: bytes | None = None, codec: str = "raw"
) -> bytes:
    """The exact diff reduced to one exact entry on a.weight with the given sections."""
    parts = Parts.of(fixtures().exact)
    parts.entries = [
        {
            "tensor": "a.weight",
            "kind": "exact",
            "dtype": "F32",
            "shape": [32, 24],
            "count": count,
            "codec": codec,
        }
    ]
    parts.sections = {
        "e0.positions": positions_section,
        "e0.xor": bytes(4 * count) if xor is None else xor,
    }
    return parts.build()


def one_entry(entry: dict[str, Any], sections: dict[str, bytes]) -> bytes:
    """The exact diff's metadata with a single entry and its ``e0.*`` sections."""
    parts = Parts.of(fixtures().exact)
    parts.entries = [entry]
    parts.sections = {f"e0.{part}": data for part, data in sections.items()}
    return parts.build()


# --------------------------------------------------------------------------- running


def decode_and_apply(
    data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, base: Model | None = None
) -> dict[str, Tensor]:
    """Open ``data``, decode every entry, apply it to ``base`` (all digests checked)."""
    with DiffReader(data, limits) as reader:
        for _ in reader:
            pass
        reader.read()
        return apply_chain(fixtures().base if base is None else base, [reader])


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], bytes]
    error: type[DiffError]
    limits: DecodeLimits = DEFAULT_LIMITS
    exact_type: bool = True
    """False: any subclass of ``error`` will do (where the precise leaf is debatable)."""
    base: Callable[[], Model] | None = None


CASES: list[Case] = []


def simple(case_id: str, data: bytes | Callable[[], bytes], error: type[DiffError]) -> None:
    CASES.append(Case(case_id, data if callable(data) else (lambda: data), error))


def edit_header(blob_name: str, edit: Callable[[dict[str, Any]], object]) -> Callable[[], bytes]:
    """A builder: the named valid diff with its safetensors header edited in place."""

    def build() -> bytes:
        header, buffer = unpack(fixtures().all_valid()[blob_name])
        edit(header)
        return pack(header, buffer)

    return build


def edit_parts(blob_name: str, edit: Callable[[Parts], object]) -> Callable[[], bytes]:
    """A builder: the named valid diff, taken apart, edited, and laid out again."""

    def build() -> bytes:
        parts = Parts.of(fixtures().all_valid()[blob_name])
        edit(parts)
        return parts.build()

    return build


def edit_entry(blob_name: str, index: int, **changes: Any) -> Callable[[], bytes]:
    """A builder: one manifest entry's keys set (a value of ``DROP`` deletes the key)."""

    def edit(parts: Parts) -> None:
        entry = parts.entries[index]
        for key, value in changes.items():
            if value is DROP:
                entry.pop(key, None)
            else:
                entry[key] = value

    return edit_parts(blob_name, edit)


DROP = object()

# --------------------------------------------------------------------------- the corpus
# Container: the safetensors framing.

simple("container/empty", b"", DiffFormatError)
simple("container/7-bytes", b"\x08\x00\x00\x00\x00\x00\x00", DiffFormatError)
simple("container/length-only", struct.pack("<Q", 0), DiffFormatError)
simple("container/header-len-2**63", struct.pack("<Q", 1 << 63) + b"{}", LimitExceededError)
simple("container/header-len-2**64-1", b"\xff" * 8 + b"{}", LimitExceededError)
simple("container/header-len-past-file", struct.pack("<Q", 4096) + b"{}", DiffFormatError)
simple("container/header-len-one-past", struct.pack("<Q", 3) + b"{}", DiffFormatError)
simple("container/not-json", pack(b"{not json"), DiffFormatError)
simple("container/not-utf8", pack(b'{"\xff\xfe":1}'), DiffFormatError)
simple("container/utf16", pack('{"a":1}'.encode("utf-16")), DiffFormatError)
simple("container/json-list", pack(b"[]"), DiffFormatError)
simple("container/json-string", pack(b'"x"'), DiffFormatError)
simple("container/json-number", pack(b"1"), DiffFormatError)
simple("container/json-null", pack(b"null"), DiffFormatError)
simple("container/empty-object", pack(b"{}"), DiffFormatError)
simple("container/trailing-nul", pack(b"{}\x00"), DiffFormatError)
simple("container/deep-nesting", pack(b"[" * 200_000 + b"]" * 200_000), DiffFormatError)
simple(
    "container/deep-nesting-objects",
    pack(b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
    DiffFormatError,
)
simple("container/int-5000-digits", pack(b'{"x":' + b"9" * 5000 + b"}"), DiffFormatError)
simple(
    "container/duplicate-section",
    lambda: pack(
        b'{"s":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
        b'"s":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
        b"ab",
    ),
    DiffFormatError,
)
simple(
    "container/duplicate-metadata",
    lambda: pack(b'{"__metadata__":{},"__metadata__":{}}'),
    DiffFormatError,
)
simple(
    "container/lone-surrogate-name",
    pack('{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
    DiffFormatError,
)


def _section(header: dict[str, Any], name: str = "e0.positions") -> dict[str, Any]:
    spec: dict[str, Any] = header[name]
    return spec


def _shift_begin(header: dict[str, Any]) -> None:
    """A one-byte hole before e1.positions (its shape shrunk to agree with its offsets)."""
    spec = _section(header, "e1.positions")
    spec["data_offsets"][0] += 1
    spec["shape"] = [spec["shape"][0] - 1]


def _overlap(header: dict[str, Any]) -> None:
    names = sorted(
        (n for n in header if n != METADATA_KEY), key=lambda n: header[n]["data_offsets"]
    )
    first, second = header[names[0]], header[names[1]]
    end = first["data_offsets"][1]
    second["data_offsets"] = [end - 1, second["data_offsets"][1] - 1]
    second["shape"] = [second["data_offsets"][1] - second["data_offsets"][0]]


def _last_section(header: dict[str, Any]) -> dict[str, Any]:
    return max(
        (spec for name, spec in header.items() if name != METADATA_KEY),
        key=lambda s: s["data_offsets"][1],
    )


def _past_end(header: dict[str, Any]) -> None:
    last = _last_section(header)
    last["data_offsets"][1] += 8
    last["shape"] = [last["shape"][0] + 8]


def _short_of_end(header: dict[str, Any]) -> None:
    last = _last_section(header)
    last["data_offsets"][1] -= 1
    last["shape"] = [last["shape"][0] - 1]


def _set(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        target = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _drop(path: tuple[str, ...]) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        target = header
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return edit


CASES.append(Case("offsets/gap", edit_header("exact", _shift_begin), DiffFormatError))
CASES.append(Case("offsets/overlap", edit_header("exact", _overlap), DiffFormatError))
CASES.append(Case("offsets/past-end", edit_header("exact", _past_end), DiffFormatError))
CASES.append(Case("offsets/short-of-end", edit_header("exact", _short_of_end), DiffFormatError))
CASES.append(
    Case("offsets/trailing-bytes", lambda: fixtures().exact + b"\x00" * 8, DiffFormatError)
)
for label, value in [
    ("reversed", [12, 0]),
    ("three", [0, 12, 24]),
    ("one", [0]),
    ("negative", [-12, 0]),
    ("float", [0.0, 12.0]),
    ("bool", [False, True]),
    ("string", "0,12"),
    ("past-u64", [2**64, 2**64 + 96]),
    ("far-past-end", [2**40, 2**40 + 96]),
]:
    CASES.append(
        Case(
            f"offsets/{label}",
            edit_header("exact", _set(("e0.data", "data_offsets"), value)),
            DiffFormatError,
        )
    )
for label, edit in [
    ("dtype-unknown", _set(("e0.data", "dtype"), "U7")),
    ("dtype-lowercase", _set(("e0.data", "dtype"), "u8")),
    ("dtype-number", _set(("e0.data", "dtype"), 8)),
    ("dtype-list", _set(("e0.data", "dtype"), ["U8"])),
    ("shape-negative", _set(("e0.data", "shape"), [-96])),
    ("shape-float", _set(("e0.data", "shape"), [96.0])),
    ("shape-bool", _set(("e0.data", "shape"), [True])),
    ("shape-string", _set(("e0.data", "shape"), "96")),
    ("shape-null", _set(("e0.data", "shape"), None)),
    ("shape-inconsistent", _set(("e0.data", "shape"), [95])),
    ("spec-not-object", _set(("e0.data",), [1, 2, 3])),
    ("spec-missing-key", _drop(("e0.data", "dtype"))),
    ("spec-extra-key", _set(("e0.data", "align"), 8)),
    ("empty-name", lambda h: h.__setitem__("", h.pop("e0.data"))),
    ("metadata-not-object", _set((METADATA_KEY,), ["format"])),
    ("metadata-value-int", _set((METADATA_KEY, "format_version"), 1)),
    ("metadata-value-null", _set((METADATA_KEY, "info"), None)),
    ("metadata-lone-surrogate", _set((METADATA_KEY, "info"), "\ud800")),
]:
    CASES.append(Case(f"header/{label}", edit_header("exact", edit), DiffFormatError))
for label, edit in [
    ("shape-2**62-elements", _set(("e0.data", "shape"), [2**31, 2**31])),
    ("shape-2**64", _set(("e0.data", "shape"), [2**64])),
    ("shape-zero-times-2**70", _set(("e0.data", "shape"), [0, 2**70])),
    ("shape-9-dims", _set(("e0.data", "shape"), [1] * 8 + [96])),
]:
    CASES.append(Case(f"header/{label}", edit_header("exact", edit), LimitExceededError))

# Sections: names, count, dtype, rank.


def _drop_section(parts: Parts) -> None:
    del parts.sections["e1.xor"]


def _extra_section(parts: Parts) -> None:
    parts.sections["e1.values"] = b"\x00" * 4


def _extra_entry_section(parts: Parts) -> None:
    parts.sections["e99.data"] = b"\x00"


def _renamed_section(parts: Parts) -> None:
    parts.sections["e1.values"] = parts.sections.pop("e1.xor")


CASES += [
    Case("section/missing", edit_parts("exact", _drop_section), DiffFormatError),
    Case("section/extra", edit_parts("exact", _extra_section), DiffFormatError),
    Case("section/extra-entry-index", edit_parts("exact", _extra_entry_section), DiffFormatError),
    Case("section/wrong-part", edit_parts("exact", _renamed_section), DiffFormatError),
    Case(
        "section/dtype-I8",
        edit_header("exact", _set(("e0.data", "dtype"), "I8")),
        DiffFormatError,
    ),
    Case(
        "section/2-d",
        edit_header("exact", _set(("e0.data", "shape"), [8, 12])),
        DiffFormatError,
    ),
]


def _f32_section(header: dict[str, Any]) -> None:
    """The 96-byte data section of a.bias declared as 24 F32 elements (sizes agree)."""
    spec = header["e0.data"]
    spec["dtype"] = "F32"
    spec["shape"] = [spec["shape"][0] // 4]


def _scalar_data_section() -> bytes:
    """A one-byte section declared as a 0-d U8 tensor (sizes agree, rank does not)."""
    data = one_entry(
        {"tensor": "z", "kind": "add", "dtype": "U8", "shape": [], "codec": "raw"},
        {"data": b"\x07"},
    )
    header, buffer = unpack(data)
    header["e0.data"]["shape"] = []
    return pack(header, buffer)


CASES += [
    Case("section/dtype-F32", edit_header("exact", _f32_section), DiffFormatError),
    Case("section/0-d", _scalar_data_section, DiffFormatError),
    Case(
        "section/too-many",
        lambda: fixtures().exact,
        LimitExceededError,
        DecodeLimits(max_tensors=4),
    ),
]

# Metadata: the manifest's top-level keys.

for label, edit in [
    ("no-metadata", _drop((METADATA_KEY,))),
    ("missing-info", _drop((METADATA_KEY, "info"))),
    ("missing-entries", _drop((METADATA_KEY, "entries"))),
    ("missing-target", _drop((METADATA_KEY, "target_digest"))),
    ("extra-key", _set((METADATA_KEY, "signature"), "x")),
    ("format-safetensors", _set((METADATA_KEY, "format"), "pt")),
    ("format-empty", _set((METADATA_KEY, "format"), "")),
    ("version-2", _set((METADATA_KEY, "format_version"), "2")),
    ("version-1.0", _set((METADATA_KEY, "format_version"), "1.0")),
    ("base-digest-short", _set((METADATA_KEY, "base_digest"), "sha256:" + "0" * 63)),
    ("base-digest-upper", _set((METADATA_KEY, "base_digest"), "sha256:" + "A" * 64)),
    ("base-digest-md5", _set((METADATA_KEY, "base_digest"), "md5:" + "0" * 32)),
    ("base-digest-newline", _set((METADATA_KEY, "base_digest"), "sha256:" + "0" * 64 + "\n")),
    ("target-digest-empty", _set((METADATA_KEY, "target_digest"), "")),
    ("target-digest-bare-hex", _set((METADATA_KEY, "target_digest"), "0" * 64)),
    ("entries-not-json", _set((METADATA_KEY, "entries"), "[{")),
    ("entries-object", _set((METADATA_KEY, "entries"), "{}")),
    ("entries-string", _set((METADATA_KEY, "entries"), '"[]"')),
    ("entries-null", _set((METADATA_KEY, "entries"), "null")),
    ("entries-int-5000-digits", _set((METADATA_KEY, "entries"), "[" + "7" * 5000 + "]")),
    ("entries-deep-nesting", _set((METADATA_KEY, "entries"), "[" * 100_000 + "]" * 100_000)),
    ("info-list", _set((METADATA_KEY, "info"), "[]")),
    ("info-not-json", _set((METADATA_KEY, "info"), "{'a': 1}")),
]:
    CASES.append(Case(f"metadata/{label}", edit_header("exact", edit), DiffFormatError))

# Entries: the manifest's entry objects.

for label, index, changes in [
    ("unknown-kind", 0, {"kind": "dense"}),
    ("kind-missing", 0, {"kind": DROP}),
    ("kind-list", 0, {"kind": ["replace"]}),
    ("kind-object", 0, {"kind": {"replace": 1}}),
    ("kind-null", 0, {"kind": None}),
    ("missing-codec", 0, {"codec": DROP}),
    ("missing-count", 1, {"count": DROP}),
    ("missing-shape", 1, {"shape": DROP}),
    ("missing-tensor", 1, {"tensor": DROP}),
    ("extra-key-seed", 1, {"seed": 0}),
    ("extra-key-values", 1, {"values": {"format": "f16", "codec": "raw"}}),
    ("name-empty", 0, {"tensor": ""}),
    ("name-int", 0, {"tensor": 7}),
    ("name-too-long", 0, {"tensor": "a" * 5000}),
    ("name-lone-surrogate", 0, {"tensor": "a.\ud800"}),
    ("dtype-unknown", 1, {"dtype": "F8"}),
    ("dtype-list", 1, {"dtype": ["F32"]}),
    ("shape-negative", 1, {"shape": [-32, -24]}),
    ("shape-float", 1, {"shape": [32.0, 24]}),
    ("shape-bool", 1, {"shape": [True, 24]}),
    ("shape-not-list", 1, {"shape": 768}),
    ("shape-dim-2**64", 1, {"shape": [2**64]}),
    ("count-above-numel", 1, {"count": 32 * 24 + 1}),
    ("count-negative", 1, {"count": -1}),
    ("count-float", 1, {"count": 145.0}),
    ("count-bool", 1, {"count": True}),
    ("count-string", 1, {"count": "145"}),
    ("codec-unknown", 1, {"codec": "lz4"}),
    ("codec-list", 1, {"codec": ["raw"]}),
    ("codec-null", 0, {"codec": None}),
    ("exact-not-matching-sections", 1, {"kind": "replace", "count": DROP}),
]:
    CASES.append(Case(f"entry/{label}", edit_entry("exact", index, **changes), DiffFormatError))
CASES += [
    Case(
        "entry/shape-2**62-elements",
        edit_entry("exact", 1, shape=[2**31, 2**31]),
        LimitExceededError,
    ),
    Case(
        "entry/shape-9-dims",
        edit_entry("exact", 1, shape=[1] * 7 + [32, 24]),
        DiffFormatError,
        exact_type=False,
    ),
    Case(
        "entry/not-object", edit_parts("exact", lambda p: p.entries.insert(0, 1)), DiffFormatError
    ),
    Case(
        "entry/list-of-lists",
        edit_parts("exact", lambda p: setattr(p, "entries", [[e] for e in p.entries])),
        DiffFormatError,
    ),
]


def _swap_first_two(parts: Parts) -> None:
    """Entries 0 and 1 swapped, sections renamed to follow them (only the order is wrong)."""
    parts.entries[0], parts.entries[1] = parts.entries[1], parts.entries[0]
    renamed = {}
    for name, data in parts.sections.items():
        index, part = name[1:].split(".")
        new_index = {"0": "1", "1": "0"}.get(index, index)
        renamed[f"e{new_index}.{part}"] = data
    parts.sections = renamed


def _duplicate_first(parts: Parts) -> None:
    """Entry 0 twice (a diff changing one tensor twice), sections shifted to match."""
    parts.entries.insert(0, parts.entries[0])
    renamed = {}
    for name, data in parts.sections.items():
        index, part = name[1:].split(".")
        renamed[f"e{int(index) + 1}.{part}"] = data
        if index == "0":
            renamed[f"e0.{part}"] = data
    parts.sections = renamed


CASES += [
    Case("entry/out-of-order", edit_parts("exact", _swap_first_two), DiffFormatError),
    Case("entry/duplicated", edit_parts("exact", _duplicate_first), DiffFormatError),
    Case("entry/sparse-out-of-order", edit_parts("sparse", _swap_first_two), DiffFormatError),
    Case("entry/sparse-duplicated", edit_parts("sparse", _duplicate_first), DiffFormatError),
]

# Sparse and hashed entries: float tensors, values, scale, buckets, seed.


def _sparse_on_int(parts: Parts) -> None:
    parts.entries[0]["dtype"] = "I32"


def _hashed_on_int(parts: Parts) -> None:
    parts.entries[0]["dtype"] = "I16"


CASES += [
    Case("sparse/int-tensor", edit_parts("sparse", _sparse_on_int), DiffFormatError),
    Case("sparse/bool-tensor", edit_entry("sparse", 0, dtype="BOOL"), DiffFormatError),
    Case("hashed/int-tensor", edit_parts("hashed", _hashed_on_int), DiffFormatError),
]
for label, values in [
    ("values-missing-codec", {"format": "f16"}),
    ("values-missing-format", {"codec": "raw"}),
    ("values-extra-key", {"format": "f16", "codec": "raw", "zero": 0}),
    ("values-not-object", ["f16", "raw"]),
    ("values-format-unknown", {"format": "f8", "codec": "raw"}),
    ("values-format-list", {"format": ["f16"], "codec": "raw"}),
    ("values-codec-unknown", {"format": "f16", "codec": "gzip"}),
    ("i8-without-scale", {"format": "i8", "codec": "raw"}),
    ("f16-with-scale", {"format": "f16", "codec": "raw", "scale": 1.0}),
    ("i8-scale-nan", {"format": "i8", "codec": "raw", "scale": float("nan")}),
    ("i8-scale-inf", {"format": "i8", "codec": "raw", "scale": float("inf")}),
    ("i8-scale-string", {"format": "i8", "codec": "raw", "scale": "0.5"}),
    ("i8-scale-bool", {"format": "i8", "codec": "raw", "scale": True}),
    ("i8-scale-null", {"format": "i8", "codec": "raw", "scale": None}),
    ("i8-scale-400-digit-int", {"format": "i8", "codec": "raw", "scale": 10**400}),
]:
    CASES.append(
        Case(f"sparse/{label}", edit_entry("sparse_i8", 0, values=values), DiffFormatError)
    )
for label, changes in [
    ("buckets-0", {"buckets": 0}),
    ("buckets-negative", {"buckets": -1}),
    ("buckets-2**32", {"buckets": 2**32}),
    ("buckets-float", {"buckets": 1.0}),
    ("buckets-missing", {"buckets": DROP}),
    ("seed-negative", {"seed": -1}),
    ("seed-2**64", {"seed": 2**64}),
    ("seed-float", {"seed": 0.5}),
    ("seed-bool", {"seed": False}),
    ("seed-string", {"seed": "12345"}),
    ("seed-missing", {"seed": DROP}),
    ("has-count", {"count": 3}),
]:
    CASES.append(Case(f"hashed/{label}", edit_entry("hashed", 0, **changes), DiffFormatError))
CASES.append(
    Case(
        "hashed/buckets-over-cap",
        lambda: fixtures().hashed,
        DiffFormatError,
        DecodeLimits(max_hash_buckets=2),
        exact_type=False,
    )
)

# Position streams (one exact entry on a.weight, n = 768).

_POS = [3, 4, 100, 101, 700]
_GAPS = gaps_of(_POS)
_K = len(_POS)


def _positions_case(case_id: str, section: Callable[[], bytes], count: int = _K) -> None:
    CASES.append(
        Case(f"positions/{case_id}", lambda: exact_entry_parts(section(), count), DiffFormatError)
    )


def _unary_with_ones(ones_delta: int) -> bytes:
    bits: list[int] = []
    for gap in _GAPS:
        bits += [0] * gap + [1]
    if ones_delta > 0:
        bits[bits.index(0)] = 1  # a zero of the first quotient becomes a one
    else:
        bits[bits.index(1)] = 0
    return rice_section(_GAPS, unary_bits=bits)


_positions_case("empty", lambda: b"")
_positions_case("unknown-mode", lambda: b"\x02" + rice_section(_GAPS)[1:])
_positions_case("mode-255", lambda: b"\xff")
_positions_case("header-truncated", lambda: rice_section(_GAPS)[:9])
_positions_case("truncated-by-one", lambda: rice_section(_GAPS)[:-1])
_positions_case("truncated-params", lambda: rice_section(_GAPS, block_log2=8)[:10])
_positions_case("trailing-byte", lambda: rice_section(_GAPS) + b"\x00")
_positions_case("block-log2-7", lambda: rice_section(_GAPS, block_log2=7))
_positions_case("block-log2-21", lambda: rice_section(_GAPS, block_log2=21))
_positions_case("block-log2-255", lambda: rice_section(_GAPS, block_log2=255))
_positions_case("unary-nbytes-2**63", lambda: rice_section(_GAPS, unary_nbytes=1 << 63))
_positions_case("unary-nbytes-2**64-1", lambda: rice_section(_GAPS, unary_nbytes=(1 << 64) - 1))
_positions_case("unary-nbytes-too-small", lambda: rice_section(_GAPS, unary_nbytes=1))
_positions_case("rice-param-33", lambda: rice_section(_GAPS, params=[33]))
_positions_case("rice-param-255", lambda: rice_section(_GAPS, params=[255]))
_positions_case("unary-extra-one", lambda: _unary_with_ones(+1))
_positions_case("unary-missing-one", lambda: _unary_with_ones(-1))
_positions_case("unary-all-ones", lambda: rice_section(_GAPS, unary_bits=[1] * 800))
_positions_case(  # 2**25 one bits: would be 256 MiB of int64 indices if listed before counting
    "unary-4MiB-of-ones",
    lambda: struct.pack("<BBQ", 0, 8, 1 << 22) + b"\x00" + b"\xff" * (1 << 22),
)
_positions_case("gap-past-n", lambda: rice_section([N, 0, 0, 0, 0]))
_positions_case("last-past-n", lambda: rice_section([0, 0, 0, 0, N - 4]))
_positions_case("sum-past-n", lambda: rice_section([400, 400, 0, 0, 0]))
_positions_case("sum-past-n-rice-8", lambda: rice_section([0, 0, 0, 300, 500], params=[8]))
_positions_case("remainder-short", lambda: rice_section(_GAPS, params=[5])[:-1])
_positions_case("all-mode-k-not-n", lambda: b"\x01")
_positions_case("all-mode-extra-byte", lambda: b"\x01\x00", count=N)
_positions_case("count-0-with-stream", lambda: rice_section(_GAPS), count=0)
_positions_case(
    "two-blocks-past-n",
    lambda: rice_section([0] * 299 + [N - 299], params=[0, 3]),
    count=300,
)
_positions_case(
    "two-blocks-mixed-params-gap-past-n",
    lambda: rice_section([0] * 256 + [4 * N], params=[0, 9]),
    count=257,
)

# Value arrays: raw lengths and Zstandard frames.


def _sparse_values(data: bytes, codec: str = "raw", fmt: str = "f16") -> bytes:
    """The sparse diff with its first entry's values section and codec replaced."""
    parts = Parts.of(fixtures().sparse)
    parts.entries[0]["values"] = {"format": fmt, "codec": codec}
    parts.sections["e0.values"] = data
    return parts.build()


def _replace_data(data: bytes, codec: str, shape: list[int], dtype: str = "F32") -> bytes:
    """One replace entry on a.bias with the given data section."""
    return one_entry(
        {"tensor": "a.bias", "kind": "replace", "dtype": dtype, "shape": shape, "codec": codec},
        {"data": data},
    )


def _sparse_count() -> int:
    count: int = Parts.of(fixtures().sparse).entries[0]["count"]
    return count


def _values_case(case_id: str, build: Callable[[], bytes]) -> None:
    CASES.append(Case(f"values/{case_id}", build, DiffFormatError))


_values_case("raw-short", lambda: _sparse_values(bytes(2 * _sparse_count() - 1)))
_values_case("raw-long", lambda: _sparse_values(bytes(2 * _sparse_count() + 1)))
_values_case("raw-empty", lambda: _sparse_values(b""))
_values_case("raw-xor-short", lambda: exact_entry_parts(rice_section(_GAPS), _K, bytes(19)))
_values_case("raw-xor-long", lambda: exact_entry_parts(rice_section(_GAPS), _K, bytes(21)))
_values_case("raw-data-short", lambda: _replace_data(bytes(4 * 24 - 4), "raw", [24]))
_values_case("zstd-empty", lambda: _sparse_values(b"", "zstd"))
_values_case("zstd-not-a-frame", lambda: _sparse_values(b"\x00" * 64, "zstd"))
_values_case("zstd-garbage", lambda: _sparse_values(bytes(range(256)), "zstd"))
_values_case(
    "zstd-truncated",
    lambda: _sparse_values(zstd_frame(bytes(range(256)) * 4)[:-7], "zstd"),
)


def _bad_checksum_frame() -> bytes:
    frame = zstd_frame(bytes(2 * _sparse_count()), checksum=True)
    return frame[:-1] + bytes([frame[-1] ^ 0xFF])


def _hashed_bomb() -> bytes:
    parts = Parts.of(fixtures().hashed)
    parts.entries[0]["values"]["codec"] = "zstd"
    parts.sections["e0.values"] = zstd_bomb()
    return parts.build()


_values_case("zstd-checksum-wrong", lambda: _sparse_values(_bad_checksum_frame(), "zstd"))
_values_case(
    "zstd-short", lambda: _sparse_values(zstd_frame(bytes(2 * _sparse_count() - 2)), "zstd")
)
_values_case(
    "zstd-long", lambda: _sparse_values(zstd_frame(bytes(2 * _sparse_count() + 2)), "zstd")
)
_values_case("zstd-empty-frame", lambda: _sparse_values(zstd_frame(b""), "zstd"))
_values_case(
    "shuffle-short", lambda: _sparse_values(zstd_frame(bytes(2 * _sparse_count() - 1)), "shuffle")
)
_values_case("zstd-data-short", lambda: _replace_data(zstd_frame(bytes(90)), "zstd", [24]))


def _undeclared_frame(data: bytes) -> bytes:
    """A frame whose header does not declare its size: it is read as a stream."""
    return zstandard.ZstdCompressor(level=3, write_content_size=False).compress(data)


# A compressed section is one frame and nothing more, whichever way it is read: in one
# call (the frame declares its size), as a stream (it does not, or the array is large).
_values_case(
    "zstd-trailing-bytes",
    lambda: _sparse_values(zstd_frame(bytes(2 * _sparse_count())) + b"junk", "zstd"),
)
_values_case(
    "zstd-second-frame",
    lambda: _sparse_values(zstd_frame(bytes(2 * _sparse_count())) + zstd_frame(b"x"), "zstd"),
)
_values_case(
    "zstd-undeclared-second-frame",
    lambda: _sparse_values(_undeclared_frame(bytes(2 * _sparse_count())) + zstd_frame(b""), "zstd"),
)
_values_case(
    "zstd-undeclared-truncated",
    lambda: _sparse_values(_undeclared_frame(bytes(range(256)) * 4)[:-3], "zstd"),
)
_values_case(
    "shuffle-trailing-bytes",
    lambda: _sparse_values(zstd_frame(bytes(2 * _sparse_count())) + b"\x00", "shuffle"),
)
_values_case(
    "zstd-large-second-frame",  # 16 MiB: read a chunk at a time
    lambda: _replace_data(
        _undeclared_frame(bytes(1 << 24)) + zstd_frame(b""), "zstd", [1 << 24], "U8"
    ),
)


def _planes(mask: int, raw_bytes: int, frame: bytes = b"") -> bytes:
    """A ``planes`` section for the f16 values of the sparse fixture: its mask byte,
    ``raw_bytes`` zero bytes of raw planes, then ``frame``."""
    return _sparse_values(bytes([mask]) + bytes(raw_bytes) + frame, "planes")


_values_case("planes-empty", lambda: _sparse_values(b"", "planes"))
_values_case("planes-mask-past-width", lambda: _planes(0b100, 2 * _sparse_count()))
_values_case("planes-raw-short", lambda: _planes(0b11, 2 * _sparse_count() - 1))
_values_case("planes-raw-long", lambda: _planes(0b11, 2 * _sparse_count() + 1))
_values_case("planes-frame-missing", lambda: _planes(0b01, _sparse_count()))
_values_case(
    "planes-frame-short",
    lambda: _planes(0b01, _sparse_count(), zstd_frame(bytes(_sparse_count() - 1))),
)
_values_case(
    "planes-frame-long",
    lambda: _planes(0b10, _sparse_count(), zstd_frame(bytes(_sparse_count() + 1))),
)
_values_case(
    "planes-frame-truncated",
    lambda: _planes(0b01, _sparse_count(), zstd_frame(bytes(range(256)) * 4)[:-7]),
)
_values_case("planes-raw-planes-cut", lambda: _planes(0b01, _sparse_count() - 3))
_values_case("planes-bomb", lambda: _planes(0b01, _sparse_count(), zstd_bomb()))
_values_case(
    "planes-frame-trailing-bytes",
    lambda: _planes(0b01, _sparse_count(), zstd_frame(bytes(_sparse_count())) + b"junk"),
)
_values_case("planes-bomb-all-packed", lambda: _planes(0, 0, zstd_bomb()))
_values_case("zstd-bomb-values", lambda: _sparse_values(zstd_bomb(), "zstd"))
_values_case("zstd-bomb-shuffle", lambda: _sparse_values(zstd_bomb(), "shuffle"))
_values_case("zstd-bomb-data", lambda: _replace_data(zstd_bomb(), "zstd", [24]))
_values_case(
    "zstd-bomb-xor",
    lambda: exact_entry_parts(rice_section(_GAPS), _K, zstd_bomb(), codec="zstd"),
)
_values_case("zstd-bomb-hashed-buckets", _hashed_bomb)

# Huge declared sizes: rejected before anything of that size is allocated.

CASES += [
    Case(
        "huge/replace-2**33-F64-over-decode-cap",
        lambda: _replace_data(zstd_frame(b"\x00" * 64), "zstd", [2**33], "F64"),
        LimitExceededError,
    ),
    Case(
        "huge/replace-2**34-elements",
        lambda: _replace_data(zstd_frame(b"\x00" * 64), "zstd", [2**34], "U8"),
        DiffFormatError,
        exact_type=False,  # a dimension over the element cap: a range error
    ),
    Case(
        "huge/replace-8GiB-tiny-frame",  # within the default caps; the frame decides
        lambda: _replace_data(zstd_frame(b"\x00" * 64), "zstd", [2**31], "F32"),
        DiffFormatError,
    ),
    Case(
        "huge/replace-8GiB-raw-tiny-section",
        lambda: _replace_data(b"\x00" * 64, "raw", [2**31], "F32"),
        DiffFormatError,
    ),
    Case(
        "huge/sparse-2**30-positions-tiny-stream",
        lambda: _huge_sparse(rice_section(_GAPS, block_log2=20)),
        DiffFormatError,
    ),
    Case(
        "huge/sparse-2**30-positions-all-mode",
        lambda: _huge_sparse(b"\x01"),
        DiffFormatError,
    ),
    Case(
        "huge/hashed-2**26-buckets-tiny-frame",
        lambda: one_entry(
            {
                "tensor": "a.weight",
                "kind": "hashed",
                "dtype": "F32",
                "shape": [32, 24],
                "seed": 1,
                "buckets": 1 << 26,
                "values": {"format": "f32", "codec": "zstd"},
            },
            {"values": zstd_frame(bytes(64))},
        ),
        DiffFormatError,
    ),
    Case(
        "huge/decoded-bytes-over-small-cap",
        lambda: fixtures().exact,
        LimitExceededError,
        DecodeLimits(max_decoded_bytes=1000),
    ),
    Case(
        "huge/elements-over-small-cap",
        lambda: fixtures().sparse,
        LimitExceededError,
        DecodeLimits(max_tensor_elements=500),
    ),
    Case(
        "huge/header-over-small-cap",
        lambda: fixtures().exact,
        LimitExceededError,
        DecodeLimits(max_header_bytes=256),
    ),
    Case(
        "huge/entries-over-small-cap",
        lambda: _removes(5),
        LimitExceededError,
        DecodeLimits(max_tensors=4),
    ),
    Case("huge/entries-over-default-cap", lambda: _bare_entries(100_001), LimitExceededError),
]


def _bare_entries(count: int) -> bytes:
    """``count`` entries that are not even objects: the count is checked before each entry."""
    parts = Parts.of(fixtures().exact)
    parts.entries = [0] * count
    parts.sections = {}
    return parts.build()


def _huge_sparse(positions: bytes) -> bytes:
    """A sparse entry of 2**30 changes (15 GiB decoded: inside the default cap)."""
    return one_entry(
        {
            "tensor": "huge",
            "kind": "sparse",
            "dtype": "F16",
            "shape": [1 << 31],
            "count": 1 << 30,
            "values": {"format": "f16", "codec": "zstd"},
        },
        {"positions": positions, "values": zstd_frame(bytes(64))},
    )


@functools.cache
def _removes(count: int) -> bytes:
    """A diff of ``count`` remove entries (no sections at all)."""
    parts = Parts.of(fixtures().exact)
    parts.entries = [
        {"tensor": f"t{i:07d}", "kind": "remove", "dtype": "F32", "shape": [1]}
        for i in range(count)
    ]
    parts.sections = {}
    return parts.build()


# Applying: digests and model compatibility.


def _set_meta(blob_name: str, key: str, value: str) -> Callable[[], bytes]:
    return edit_header(blob_name, _set((METADATA_KEY, key), value))


_OTHER_DIGEST = "sha256:" + "ab" * 32


def _flip_xor(parts: Parts) -> None:
    data = bytearray(parts.sections["e4.xor"])  # d.steps, raw I64
    data[0] ^= 0x40
    parts.sections["e4.xor"] = bytes(data)


def _flip_value(parts: Parts) -> None:
    data = bytearray(parts.sections["e0.values"])
    data[1] ^= 0x08
    parts.sections["e0.values"] = bytes(data)


CASES += [
    Case(
        "apply/wrong-base",
        lambda: fixtures().exact,
        BaseMismatchError,
        base=lambda: fixtures().other,
    ),
    Case(
        "apply/wrong-base-sparse",
        lambda: fixtures().sparse,
        BaseMismatchError,
        base=lambda: fixtures().other,
    ),
    Case(
        "apply/wrong-base-hashed",
        lambda: fixtures().hashed,
        BaseMismatchError,
        base=lambda: fixtures().other,
    ),
    Case(
        "apply/declared-base-other",
        _set_meta("exact", "base_digest", _OTHER_DIGEST),
        BaseMismatchError,
    ),
    Case(
        "apply/declared-target-other",
        _set_meta("exact", "target_digest", _OTHER_DIGEST),
        TargetMismatchError,
    ),
    Case(
        "apply/declared-target-other-sparse",
        _set_meta("sparse", "target_digest", _OTHER_DIGEST),
        TargetMismatchError,
    ),
    Case(
        "apply/declared-target-other-hashed",
        _set_meta("hashed", "target_digest", _OTHER_DIGEST),
        TargetMismatchError,
    ),
    Case("apply/xor-bit-flipped", edit_parts("exact", _flip_xor), TargetMismatchError),
    Case("apply/value-bit-flipped", edit_parts("sparse", _flip_value), TargetMismatchError),
    Case("apply/hashed-seed-changed", edit_entry("hashed", 0, seed=12346), TargetMismatchError),
    Case(
        "apply/i8-scale-changed",
        edit_entry("sparse_i8", 0, values={"format": "i8", "codec": "raw", "scale": 0.5}),
        TargetMismatchError,
    ),
    Case("apply/missing-tensor", edit_entry("exact", 4, tensor="d.zzz"), IncompatibleModelError),
    Case("apply/wrong-dtype", edit_entry("sparse", 0, dtype="F64"), IncompatibleModelError),
    Case("apply/wrong-shape", edit_entry("sparse", 0, shape=[24, 32]), IncompatibleModelError),
    Case("apply/remove-wrong-shape", edit_entry("exact", 5, shape=[9]), IncompatibleModelError),
    Case(
        "apply/add-existing",
        lambda: one_entry(
            {"tensor": "a.weight", "kind": "add", "dtype": "U8", "shape": [1], "codec": "raw"},
            {"data": b"\x01"},
        ),
        IncompatibleModelError,
    ),
    Case(
        "apply/replace-missing",
        lambda: one_entry(
            {"tensor": "nope", "kind": "replace", "dtype": "U8", "shape": [1], "codec": "raw"},
            {"data": b"\x01"},
        ),
        IncompatibleModelError,
    ),
]


# --------------------------------------------------------------------------- tests


def _case_id(case_: Case) -> str:
    return case_.id


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("name", ["exact", "sparse", "sparse_i8", "hashed"])
def test_valid_diffs_apply(name: str) -> None:
    """The control: the diffs every case breaks are sound, and survive take-apart/rebuild."""
    blob = fixtures().all_valid()[name]
    result = decode_and_apply(blob)
    with DiffReader(blob) as reader:
        assert model_digest(result) == reader.target_digest
    rebuilt = Parts.of(blob).build()
    assert model_digest(decode_and_apply(rebuilt)) == model_digest(result)


def test_rice_helper_matches_the_decoder() -> None:
    """The hand-written position coder agrees with diffs.positions on valid input."""
    blob = exact_entry_parts(rice_section(_GAPS, params=[2]), _K, xor=bytes(4 * _K))
    with DiffReader(blob) as reader:
        entry = reader.entry(0)
    assert entry.positions.tolist() == _POS  # type: ignore[union-attr]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case_", CASES, ids=_case_id)
def test_hostile_file_is_a_named_error(case_: Case) -> None:
    data = case_.build()
    base = case_.base() if case_.base is not None else None
    start = time.perf_counter()
    with pytest.raises(DiffError) as info:
        decode_and_apply(data, case_.limits, base)
    elapsed = time.perf_counter() - start
    if case_.exact_type:
        assert type(info.value) is case_.error, f"{type(info.value).__name__}: {info.value}"
    else:
        assert isinstance(info.value, case_.error), f"{type(info.value).__name__}: {info.value}"
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.3f} s"


def _traced(action: Callable[[], object]) -> tuple[BaseException | None, float, int]:
    """Run ``action``; return what it raised, the seconds it took, its peak allocation."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    raised: BaseException | None = None
    try:
        action()
    except BaseException as exc:  # handed back to the caller
        raised = exc
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return raised, elapsed, peak


@pytest.mark.parametrize(
    "case_id",
    [
        "values/zstd-bomb-values",
        "values/zstd-bomb-shuffle",
        "values/zstd-bomb-data",
        "values/zstd-bomb-xor",
        "values/zstd-bomb-hashed-buckets",
        "huge/replace-8GiB-tiny-frame",
        "huge/sparse-2**30-positions-tiny-stream",
        "huge/hashed-2**26-buckets-tiny-frame",
        "positions/unary-4MiB-of-ones",
    ],
)
def test_rejecting_costs_little_memory(case_id: str) -> None:
    """A 1 GiB zip bomb, or a declared 8 GiB array with a tiny frame, allocates little."""
    (case_,) = [c for c in CASES if c.id == case_id]
    data = case_.build()
    raised, elapsed, peak = _traced(lambda: decode_and_apply(data, case_.limits))
    assert isinstance(raised, DiffFormatError), repr(raised)
    assert elapsed < TIME_LIMIT_S
    assert peak < MEMORY_LIMIT, f"peak allocation {peak / 2**20:.1f} MiB"


def test_zstd_bomb_really_is_a_bomb() -> None:
    """The bomb is small and declares (and holds) 1 GiB: the cases above are meaningful."""
    bomb = zstd_bomb()
    assert len(bomb) < 64 * 1024
    assert zstandard.frame_content_size(bomb) == 1 << 30


@pytest.mark.parametrize("name", ["exact", "sparse", "sparse_i8", "hashed"])
def test_every_prefix_is_rejected(name: str) -> None:
    """Truncation at every byte offset of a valid diff raises DiffFormatError, fast."""
    blob = fixtures().all_valid()[name]
    total = time.perf_counter()
    for length in range(len(blob)):
        start = time.perf_counter()
        with pytest.raises(DiffError) as info:
            decode_and_apply(blob[:length])
        assert type(info.value) is DiffFormatError, (length, info.value)
        assert time.perf_counter() - start < TIME_LIMIT_S, length
    assert time.perf_counter() - total < 30


def test_every_appended_byte_count_is_rejected() -> None:
    blob = fixtures().sparse
    for extra in (1, 7, 8, 4096):
        with pytest.raises(DiffFormatError):
            decode_and_apply(blob + b"\x00" * extra)


# Applying to files, as a device does: nothing is written on any error.


def _write_case(tmp_path: Path, blob: bytes, base: Model) -> tuple[Path, Path, Path]:
    base_path = tmp_path / "base.safetensors"
    save_model(base_path, base)
    diff_path = tmp_path / "update.diff"
    diff_path.write_bytes(blob)
    return base_path, diff_path, tmp_path / "out.safetensors"


def _apply_file(base_path: Path, diff_path: Path, out_path: Path) -> str:
    with DiffReader(diff_path) as reader:
        return apply_to_file(base_path, [reader], out_path)


@pytest.mark.parametrize(
    ("blob_name", "edit", "base_name", "error"),
    [
        ("sparse", None, "other", BaseMismatchError),  # in place
        ("exact", None, "other", BaseMismatchError),  # rewrite
        ("sparse", "target", "base", TargetMismatchError),
        ("hashed", "target", "base", TargetMismatchError),
        ("exact", "target", "base", TargetMismatchError),
        ("exact", "xor", "base", TargetMismatchError),
        ("sparse", "values", "base", TargetMismatchError),
        ("sparse", "count", "base", DiffFormatError),
    ],
)
def test_apply_to_file_rejects(
    tmp_path: Path, blob_name: str, edit: str | None, base_name: str, error: type[DiffError]
) -> None:
    parts = Parts.of(fixtures().all_valid()[blob_name])
    if edit == "target":
        parts.metadata["target_digest"] = _OTHER_DIGEST
    elif edit == "xor":
        _flip_xor(parts)
    elif edit == "values":
        _flip_value(parts)
    elif edit == "count":
        parts.entries[0]["count"] += 1
    base = fixtures().base if base_name == "base" else fixtures().other
    paths = _write_case(tmp_path, parts.build(), base)
    start = time.perf_counter()
    with pytest.raises(DiffError) as info:
        _apply_file(*paths)
    assert type(info.value) is error, info.value
    assert time.perf_counter() - start < TIME_LIMIT_S
    assert not paths[2].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "update.diff"]


@pytest.mark.parametrize("name", ["exact", "sparse", "hashed"])
def test_apply_to_file_accepts_the_valid_diffs(tmp_path: Path, name: str) -> None:
    paths = _write_case(tmp_path, fixtures().all_valid()[name], fixtures().base)
    digest = _apply_file(*paths)
    with DiffReader(paths[1]) as reader:
        assert digest == reader.target_digest


def test_hostile_diff_files_open_from_disk(tmp_path: Path) -> None:
    """The memory-mapped path rejects like the bytes path (a sample of the corpus)."""
    for case_ in CASES[::7]:
        if case_.base is not None:
            continue
        path = tmp_path / "case.diff"
        path.write_bytes(case_.build())
        with pytest.raises(DiffError) as info:
            _open_decode_apply(path, case_.limits)
        assert isinstance(info.value, case_.error), (case_.id, info.value)


def _open_decode_apply(path: Path, limits: DecodeLimits) -> None:
    with DiffReader(path, limits) as reader:
        for _ in reader:
            pass
        apply_chain(fixtures().base, [reader])


def test_missing_diff_file_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(DiffFormatError):
        DiffReader(tmp_path / "absent.diff")


@pytest.mark.slow
def test_positions_cannot_overflow_int64() -> None:
    """Mixed Rice parameters: a quotient of 2**31 in a block of r = 32 is a gap of 2**63.

    Shifted in int64 it wrapped to a negative gap, and the decoder returned a negative
    position (an IndexError, or a write at the wrong place, when applied). Every gap is
    now bounded by its own block's parameter. Needs a 256 MiB unary stream (and about
    2.5 GiB of memory to decode), hence slow.
    """
    n = 1 << 33
    params = bytes([0, 32])
    unary = b"\xff" * 32 + bytes(1 << 28) + b"\x01"  # 256 gaps of 0, then q = 2**31
    remainders = bytes(4)  # r = 32 bits of zeros for the last gap
    section = struct.pack("<BBQ", 0, 8, len(unary)) + params + unary + remainders
    with pytest.raises(DiffFormatError, match="gap runs past"):
        decode_positions(section, 257, n)
