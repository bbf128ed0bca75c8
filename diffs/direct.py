"""Applying a sparse or exact entry straight from its encoded sections.

What a device does most is patch such entries into the tensors of a model file. Decoding
an entry first (:meth:`diffs.container.DiffReader.entry`) builds ``k`` int64 positions
and ``k`` values in memory, then scatters them: three passes over memory and two
``k``-sized buffers whose fresh pages the kernel must fault in. The compiled kernel
``rice_patch`` instead decodes positions a thousand at a time into a small buffer
(prefetching the cache line each will write) and applies each value from the section's
bytes (or byte planes) as it goes.

It covers exact entries (XOR, any dtype) and sparse entries of F32 tensors (f32 deltas
applied from the section's bytes; f16, bf16 and i8 deltas widened to binary32 by numpy
first); everything else, and every process without the compiled kernels, takes the
decoded path. Either way a bad entry leaves the tensor as it was: the decoded path checks
every stream before it writes; the kernel checks each chunk of positions before writing
it and keeps the elements it overwrites, putting them back if a later chunk is bad. Both
give the same bits (``tests/diffs/test_kernels.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from diffs.container import DiffReader
from diffs.dtypes import DType
from diffs.errors import DiffFormatError
from diffs.kernels import native
from diffs.manifest import EntrySpec
from diffs.positions import rice_streams
from diffs.values import PLANAR_CODECS, ValueFormat, Values, array_bytes, decode_array


def patch_direct(reader: DiffReader, index: int, flat: npt.NDArray[Any]) -> bool:
    """Apply entry ``index`` of ``reader`` to ``flat``, the flat storage of the tensor it
    was checked to fit; ``False``, with nothing done, where the kernel does not cover it.

    Raises :class:`diffs.errors.DiffFormatError` (nothing written) on bad streams.
    """
    flags = flat.flags
    if native is None or not (flags.c_contiguous and flags.writeable):
        return False
    spec = reader.specs[index]
    if spec.kind == "exact" and spec.codec is not None:
        target, add = flat.view(spec.dtype.bits), False
    elif spec.kind == "sparse" and spec.dtype is DType.F32 and spec.values is not None:
        target, add = flat.view(np.float32), True
    else:
        return False
    if target.size != spec.numel:
        return False
    streams = rice_streams(reader.section(index, "positions"), spec.count, spec.numel)
    if streams is None:  # every position: nothing to decode, the decoded path is as fast
        return False
    values, shuffled = _values(reader, index, spec, target.itemsize)
    try:
        native.rice_patch(
            streams.unary,
            streams.params,
            streams.block_log2,
            streams.remainders,
            spec.count,
            spec.numel,
            target,
            values,
            target.itemsize,
            shuffled,
            add,
        )
    except native.DecodeError as exc:
        raise DiffFormatError(str(exc)) from None
    return True


def _values(reader: DiffReader, index: int, spec: EntrySpec, width: int) -> tuple[Any, bool]:
    """The bytes the kernel applies, and whether they are shuffled into byte planes: the
    section's own bytes for XOR patterns and f32 deltas; other delta formats widened to
    binary32 first, by the numpy code that defines them."""
    if spec.kind == "exact":
        assert spec.codec is not None
        raw = array_bytes(reader.section(index, "xor"), spec.codec, spec.count, width)
        return raw, spec.codec in PLANAR_CODECS
    vs = spec.values
    assert vs is not None
    if vs.format is ValueFormat.F32:
        raw = array_bytes(reader.section(index, "values"), vs.codec, spec.count, width)
        return raw, vs.codec in PLANAR_CODECS
    data = decode_array(reader.section(index, "values"), vs.codec, vs.format.storage, spec.count)
    with np.errstate(over="ignore", invalid="ignore"):  # i8 times scale may overflow: defined
        widened = Values(vs.format, data, vs.scale).widened()
    return np.ascontiguousarray(widened, dtype=np.float32), False
