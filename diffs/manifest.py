"""The JSON manifest of a diff file: what each entry is, validated before any decoding.

A diff file's safetensors ``__metadata__`` holds exactly these keys:

- ``format`` = ``"diffcast.diff"``, ``format_version`` = ``"1"``
- ``base_digest``, ``target_digest``: canonical model digests (``sha256:<hex>``)
- ``entries``: a JSON array, one object per changed tensor, in canonical name order
- ``info``: a JSON object of free-form facts (producer, method, budget...)

See ``docs/diff-format.md`` for every field. :func:`parse_manifest` checks every field's
type and range, every declared size against :class:`~diffs.limits.DecodeLimits`, and
the sum of what decoding would allocate, so that nothing is decoded from a diff whose
manifest is not entirely sound.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffs.digest import check_digest
from diffs.dtypes import DType
from diffs.errors import DiffError, DiffFormatError, LimitExceededError
from diffs.limits import DecodeLimits
from diffs.safetensors_file import numel, sort_key
from diffs.values import Codec, ValueFormat

FORMAT_NAME = "diffcast.diff"
FORMAT_VERSION = "1"
METADATA_KEYS = frozenset(
    {"format", "format_version", "base_digest", "target_digest", "entries", "info"}
)
KINDS = ("sparse", "hashed", "exact", "replace", "add", "remove")
MAX_NAME_BYTES = 4096

_KEYS: dict[str, frozenset[str]] = {
    "sparse": frozenset({"tensor", "kind", "dtype", "shape", "count", "values"}),
    "hashed": frozenset({"tensor", "kind", "dtype", "shape", "seed", "buckets", "values"}),
    "exact": frozenset({"tensor", "kind", "dtype", "shape", "count", "codec"}),
    "replace": frozenset({"tensor", "kind", "dtype", "shape", "codec"}),
    "add": frozenset({"tensor", "kind", "dtype", "shape", "codec"}),
    "remove": frozenset({"tensor", "kind", "dtype", "shape"}),
}
SECTIONS: dict[str, tuple[str, ...]] = {
    "sparse": ("positions", "values"),
    "hashed": ("values",),
    "exact": ("positions", "xor"),
    "replace": ("data",),
    "add": ("data",),
    "remove": (),
}


@dataclass(frozen=True)
class ValuesSpec:
    format: ValueFormat
    codec: Codec
    scale: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.format.value, "codec": self.codec.value}
        if self.scale is not None:
            out["scale"] = self.scale
        return out


@dataclass(frozen=True)
class EntrySpec:
    """One entry of the manifest: a change to tensor ``name``."""

    name: str
    kind: str
    dtype: DType
    """For in-place kinds and remove: the tensor's dtype; for replace/add: the new dtype."""
    shape: tuple[int, ...]
    count: int = 0
    """Changed elements (sparse, exact); buckets (hashed); elements (replace, add)."""
    seed: int = 0
    values: ValuesSpec | None = None
    codec: Codec | None = None

    @functools.cached_property
    def numel(self) -> int:
        return numel(self.shape)

    def section_name(self, index: int, part: str) -> str:
        return f"e{index}.{part}"

    def decoded_bytes(self) -> int:
        """What decoding the entry allocates, at most (positions are int64)."""
        if self.kind == "sparse":
            assert self.values is not None
            return self.count * (8 + 4 + self.values.format.storage.itemsize)
        if self.kind == "hashed":
            return self.count * 8
        if self.kind == "exact":
            return self.count * (8 + self.dtype.itemsize)
        if self.kind in ("replace", "add"):
            return self.numel * self.dtype.itemsize
        return 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tensor": self.name,
            "kind": self.kind,
            "dtype": self.dtype.value,
            "shape": list(self.shape),
        }
        if self.kind in ("sparse", "exact"):
            out["count"] = self.count
        if self.kind == "hashed":
            out["seed"] = self.seed
            out["buckets"] = self.count
        if self.values is not None:
            out["values"] = self.values.to_json()
        if self.codec is not None:
            out["codec"] = self.codec.value
        return out


@dataclass(frozen=True)
class Manifest:
    base_digest: str
    target_digest: str
    entries: tuple[EntrySpec, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "base_digest": self.base_digest,
            "target_digest": self.target_digest,
            "entries": json.dumps([e.to_json() for e in self.entries], separators=(",", ":")),
            "info": json.dumps(self.info, sort_keys=True, separators=(",", ":")),
        }

    def expected_sections(self) -> list[str]:
        return [
            entry.section_name(i, part)
            for i, entry in enumerate(self.entries)
            for part in SECTIONS[entry.kind]
        ]


def parse_manifest(metadata: Mapping[str, str], limits: DecodeLimits) -> Manifest:
    """Validate a diff file's metadata completely; raise :class:`DiffFormatError` if unsound."""
    if set(metadata) != METADATA_KEYS:
        missing = sorted(METADATA_KEYS - set(metadata))
        extra = sorted(set(metadata) - METADATA_KEYS)
        raise DiffFormatError(f"diff metadata keys wrong (missing {missing}, unexpected {extra})")
    if metadata["format"] != FORMAT_NAME:
        raise DiffFormatError(f"not a diffcast diff (format {metadata['format']!r})")
    if metadata["format_version"] != FORMAT_VERSION:
        raise DiffFormatError(f"unsupported diff format version {metadata['format_version']!r}")
    base = check_digest(metadata["base_digest"], "base digest")
    target = check_digest(metadata["target_digest"], "target digest")
    raw_entries = _json(metadata["entries"], "entries")
    info = _json(metadata["info"], "info")
    if not isinstance(raw_entries, list):
        raise DiffFormatError("entries must be a JSON array")
    if not isinstance(info, dict):
        raise DiffFormatError("info must be a JSON object")
    if len(raw_entries) > limits.max_tensors:
        raise LimitExceededError(f"diff declares {len(raw_entries)} entries")
    entries = tuple(_entry(raw, limits) for raw in raw_entries)
    for before, after in itertools.pairwise(entries):
        if sort_key(before.name) >= sort_key(after.name):
            raise DiffFormatError(
                f"entries must be in strictly increasing name order ({after.name!r} after "
                f"{before.name!r})"
            )
    decoded = sum(e.decoded_bytes() for e in entries)
    if decoded > limits.max_decoded_bytes:
        raise LimitExceededError(f"decoding would allocate {decoded} bytes")
    return Manifest(base, target, entries, info)


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also ints of > 4300 digits
        raise DiffFormatError(f"{what} is not valid JSON: {exc}") from None


def _int(value: object, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise DiffFormatError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _entry(raw: object, limits: DecodeLimits) -> EntrySpec:
    if not isinstance(raw, dict):
        raise DiffFormatError("each entry must be a JSON object")
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in _KEYS:  # a list kind is unhashable
        raise DiffFormatError(f"unknown entry kind {kind!r}")
    if set(raw) != _KEYS[kind]:
        raise DiffFormatError(f"{kind} entry must have exactly the keys {sorted(_KEYS[kind])}")
    name = raw["tensor"]
    if not isinstance(name, str) or not name or len(_utf8(name)) > MAX_NAME_BYTES:
        raise DiffFormatError(f"bad tensor name {name!r}")
    try:
        dtype = DType.parse(raw["dtype"])
    except DiffError as exc:
        raise DiffFormatError(f"tensor {name!r}: {exc}") from None
    shape_raw = raw["shape"]
    if not isinstance(shape_raw, list) or len(shape_raw) > limits.max_ndim:
        raise DiffFormatError(f"tensor {name!r}: shape must be a list of at most {limits.max_ndim}")
    shape = tuple(_int(d, f"{name!r} dimension", 0, limits.max_tensor_elements) for d in shape_raw)
    n = numel(shape)
    if n > limits.max_tensor_elements:
        raise LimitExceededError(f"tensor {name!r} declares {n} elements")
    if kind in ("sparse", "hashed") and not dtype.is_float:
        raise DiffFormatError(f"{kind} entry for {name!r} needs a float tensor, not {dtype.value}")
    spec = EntrySpec(name, kind, dtype, shape)
    if kind in ("sparse", "exact"):
        spec = EntrySpec(name, kind, dtype, shape, count=_int(raw["count"], "count", 0, n))
    if kind == "hashed":
        buckets = _int(raw["buckets"], "buckets", 1, min(limits.max_hash_buckets, 2**32 - 1))
        spec = EntrySpec(
            name, kind, dtype, shape, count=buckets, seed=_int(raw["seed"], "seed", 0, 2**64 - 1)
        )
    if "values" in raw:
        spec = EntrySpec(**{**spec.__dict__, "values": _values(raw["values"], name)})
    if "codec" in raw:
        spec = EntrySpec(**{**spec.__dict__, "codec": _codec(raw["codec"], name)})
    return spec


def _utf8(text: str) -> bytes:
    """The UTF-8 bytes of ``text``; a lone surrogate (a JSON escape) is a format error."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise DiffFormatError(f"tensor name {text!r} is not valid UTF-8") from None


def _codec(raw: object, name: str) -> Codec:
    try:
        return Codec(raw)
    except ValueError:
        raise DiffFormatError(f"tensor {name!r}: unknown codec {raw!r}") from None


def _values(raw: object, name: str) -> ValuesSpec:
    if not isinstance(raw, dict) or not {"format", "codec"} <= set(raw) <= {
        "format",
        "codec",
        "scale",
    }:
        raise DiffFormatError(f"tensor {name!r}: values must have format, codec (and scale)")
    try:
        fmt = ValueFormat(raw["format"])
    except ValueError:
        raise DiffFormatError(f"tensor {name!r}: unknown value format {raw['format']!r}") from None
    codec = _codec(raw["codec"], name)
    scale = raw.get("scale")
    if (fmt is ValueFormat.I8) != (scale is not None):
        raise DiffFormatError(f"tensor {name!r}: a scale goes with i8 values, and only with them")
    if scale is not None:
        if not isinstance(scale, int | float) or isinstance(scale, bool):
            raise DiffFormatError(f"tensor {name!r}: scale must be a finite number")
        try:
            scale = float(scale)  # an int of 400 digits overflows
        except OverflowError:
            scale = math.inf
        if not math.isfinite(scale):
            raise DiffFormatError(f"tensor {name!r}: scale must be a finite number")
    return ValuesSpec(fmt, codec, scale)
