"""Diff files: a valid safetensors file whose tensors are the entries' byte sections.

Each section is a 1-D ``U8`` tensor named ``e<index>.<part>`` (``positions``, ``values``,
``xor`` or ``data``); the manifest (:mod:`diffs.manifest`) sits in ``__metadata__``. Any
safetensors tool can open a diff; only this module gives the bytes meaning.

:class:`DiffReader` validates the header and the whole manifest on open, and decodes one
entry at a time on demand, so memory follows the largest entry, never the whole diff.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

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
from diffs.errors import DiffFormatError, ModelFormatError
from diffs.fileio import atomic_output
from diffs.limits import DEFAULT_LIMITS, DecodeLimits
from diffs.manifest import EntrySpec, Manifest, ValuesSpec, parse_manifest
from diffs.model import Tensor
from diffs.positions import DEFAULT_BLOCK_LOG2, decode_positions, encode_positions
from diffs.safetensors_file import TensorLayout, parse_header, sort_key, write_safetensors
from diffs.values import Values, best_encoding, decode_array


@dataclass(frozen=True)
class EncodeOptions:
    zstd_level: int = 19
    """Zstandard level for compressed sections (1-22)."""
    position_block_log2: int = DEFAULT_BLOCK_LOG2


DEFAULT_OPTIONS = EncodeOptions()


@dataclass(frozen=True)
class Diff:
    """One update of one model, from the base digest to the target digest."""

    base_digest: str
    target_digest: str
    entries: Sequence[Entry]
    info: dict[str, Any] = field(default_factory=dict)


def encode_diff(
    diff: Diff, options: EncodeOptions = DEFAULT_OPTIONS
) -> tuple[Manifest, dict[str, bytes]]:
    """The manifest and section bytes of ``diff`` (entries are put in canonical order)."""
    entries = sorted(diff.entries, key=lambda e: sort_key(e.name))
    specs: list[EntrySpec] = []
    sections: dict[str, bytes] = {}
    for index, entry in enumerate(entries):
        spec, parts = _encode_entry(entry, options)
        specs.append(spec)
        for part, data in parts.items():
            sections[spec.section_name(index, part)] = data
    manifest = Manifest(diff.base_digest, diff.target_digest, tuple(specs), dict(diff.info))
    return manifest, sections


def write_diff(
    path: str | os.PathLike[str], diff: Diff, options: EncodeOptions = DEFAULT_OPTIONS
) -> Manifest:
    """Encode ``diff`` and write it atomically to ``path``."""
    manifest, sections = encode_diff(diff, options)
    with atomic_output(path) as out:
        _write_encoded(out, manifest, sections)
    return manifest


def diff_bytes(diff: Diff, options: EncodeOptions = DEFAULT_OPTIONS) -> bytes:
    """The encoded file as bytes (for small diffs and tests)."""
    out = io.BytesIO()
    _write_encoded(out, *encode_diff(diff, options))
    return out.getvalue()


def _write_encoded(out: BinaryIO, manifest: Manifest, sections: dict[str, bytes]) -> None:
    layouts = [TensorLayout(name, DType.U8, (len(data),)) for name, data in sections.items()]

    def write_data(layout: TensorLayout, sink: BinaryIO) -> None:
        sink.write(sections[layout.name])

    write_safetensors(out, layouts, write_data, manifest.to_metadata())


def _values_parts(values: Values, level: int) -> tuple[ValuesSpec, bytes]:
    codec, data = best_encoding(values.data, level)
    return ValuesSpec(values.format, codec, values.scale), data


def _encode_entry(entry: Entry, options: EncodeOptions) -> tuple[EntrySpec, dict[str, bytes]]:
    level = options.zstd_level
    if isinstance(entry, SparseEntry):
        n = int(np.prod(entry.shape))
        if entry.positions.size != len(entry.values):
            raise ValueError("a sparse entry needs one value per position")
        vspec, vdata = _values_parts(entry.values, level)
        positions = encode_positions(entry.positions, n, options.position_block_log2)
        spec = EntrySpec(
            entry.name, "sparse", entry.dtype, entry.shape, count=entry.positions.size, values=vspec
        )
        return spec, {"positions": positions, "values": vdata}
    if isinstance(entry, HashedEntry):
        vspec, vdata = _values_parts(entry.buckets, level)
        spec = EntrySpec(
            entry.name,
            "hashed",
            entry.dtype,
            entry.shape,
            count=len(entry.buckets),
            seed=entry.seed,
            values=vspec,
        )
        return spec, {"values": vdata}
    if isinstance(entry, ExactEntry):
        n = int(np.prod(entry.shape))
        codec, xdata = best_encoding(entry.xor.astype(entry.dtype.bits, copy=False), level)
        positions = encode_positions(entry.positions, n, options.position_block_log2)
        spec = EntrySpec(
            entry.name, "exact", entry.dtype, entry.shape, count=entry.positions.size, codec=codec
        )
        return spec, {"positions": positions, "xor": xdata}
    if isinstance(entry, ReplaceEntry | AddEntry):
        codec, data = best_encoding(entry.tensor.array, level)
        spec = EntrySpec(
            entry.name, entry.kind, entry.tensor.dtype, entry.tensor.shape, codec=codec
        )
        return spec, {"data": data}
    return EntrySpec(entry.name, "remove", entry.dtype, entry.shape), {}


class DiffReader:
    """A validated diff file; entries decode lazily, one at a time.

    Open from a path (memory-mapped) or from bytes. Everything about the file is checked
    on open except the entries' encoded streams, which :meth:`entry` checks as it decodes.
    """

    def __init__(
        self, source: str | os.PathLike[str] | bytes, limits: DecodeLimits = DEFAULT_LIMITS
    ) -> None:
        self._map: mmap.mmap | None = None
        self._file: BinaryIO | None = None
        if isinstance(source, bytes):
            self.path: Path | None = None
            self._buffer: memoryview = memoryview(source)
            handle: BinaryIO = io.BytesIO(source)
            size = len(source)
        else:
            self.path = Path(source)
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115
            except OSError as exc:
                raise DiffFormatError(f"cannot open diff {self.path}: {exc.strerror}") from None
            handle = self._file
            size = os.fstat(handle.fileno()).st_size
        try:
            try:
                header = parse_header(handle, size, limits)
            except ModelFormatError as exc:
                raise DiffFormatError(f"not a valid diff container: {exc}") from exc
            self.manifest = parse_manifest(header.metadata, limits)
            expected = self.manifest.expected_sections()
            if sorted(expected, key=sort_key) != list(header.tensors):
                raise DiffFormatError("the file's sections do not match its entries")
            for info in header.tensors.values():
                if info.dtype is not DType.U8 or len(info.shape) != 1:
                    raise DiffFormatError(f"section {info.name!r} must be a 1-D U8 tensor")
            self._sections = {name: (info.begin, info.end) for name, info in header.tensors.items()}
            if self._file is not None and size > 0:
                self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
                self._buffer = memoryview(self._map)
        except BaseException:
            self.close()
            raise
        self.limits = limits

    @property
    def base_digest(self) -> str:
        return self.manifest.base_digest

    @property
    def target_digest(self) -> str:
        return self.manifest.target_digest

    @property
    def specs(self) -> tuple[EntrySpec, ...]:
        return self.manifest.entries

    def section(self, index: int, part: str) -> memoryview:
        begin, end = self._sections[self.specs[index].section_name(index, part)]
        return self._buffer[begin:end]

    def section_sizes(self, index: int) -> dict[str, int]:
        spec = self.specs[index]
        names = {
            part: spec.section_name(index, part) for part in ("positions", "values", "xor", "data")
        }
        return {
            part: end - begin
            for part, name in names.items()
            if name in self._sections
            for begin, end in [self._sections[name]]
        }

    def entry(self, index: int) -> Entry:
        """Decode entry ``index``; raise :class:`DiffFormatError` if its streams are bad."""
        spec = self.specs[index]
        if spec.kind == "remove":
            return RemoveEntry(spec.name, spec.dtype, spec.shape)
        if spec.kind in ("replace", "add"):
            assert spec.codec is not None
            array = decode_array(
                self.section(index, "data"), spec.codec, spec.dtype.storage, spec.numel
            )
            tensor = Tensor(spec.dtype, array.reshape(spec.shape))
            return (
                ReplaceEntry(spec.name, tensor)
                if spec.kind == "replace"
                else AddEntry(spec.name, tensor)
            )
        if spec.kind == "hashed":
            return HashedEntry(
                spec.name, spec.dtype, spec.shape, spec.seed, self._values(index, spec)
            )
        positions = decode_positions(self.section(index, "positions"), spec.count, spec.numel)
        if spec.kind == "sparse":
            return SparseEntry(
                spec.name, spec.dtype, spec.shape, positions, self._values(index, spec)
            )
        assert spec.codec is not None
        xor = decode_array(self.section(index, "xor"), spec.codec, spec.dtype.bits, spec.count)
        return ExactEntry(spec.name, spec.dtype, spec.shape, positions, xor)

    def _values(self, index: int, spec: EntrySpec) -> Values:
        assert spec.values is not None
        vs = spec.values
        data = decode_array(self.section(index, "values"), vs.codec, vs.format.storage, spec.count)
        return Values(vs.format, data, vs.scale)

    def __iter__(self) -> Iterator[Entry]:
        for index in range(len(self.specs)):
            yield self.entry(index)

    def read(self) -> Diff:
        """Decode every entry into an in-memory :class:`Diff`."""
        return Diff(self.base_digest, self.target_digest, list(self), dict(self.manifest.info))

    def close(self) -> None:
        self._buffer = memoryview(b"")
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a decoded view still holds it
                self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> DiffReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
