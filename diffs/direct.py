"""Applying a sparse or exact entry straight from its encoded sections.

What a device does most is patch such entries into the tensors of a model file. Decoding
an entry first (:meth:`diffs.container.DiffReader.entry`) builds ``k`` int64 positions
and ``k`` values in memory, then scatters them: three passes over memory and two
``k``-sized buffers whose fresh pages the kernel must fault in. The compiled kernel
``patch_section`` instead reads the position section's header itself, decodes positions
a thousand at a time into a small buffer, reads the elements they name (one cache miss
each, as many in flight as the core allows; on AMD prefetched while decoding), then
applies each value from the section's decompressed bytes, or from its byte planes where
they lie (:func:`diffs.values.array_parts`: no copy puts them in order).

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
from diffs.positions import MODE_ALL
from diffs.values import ArrayParts, ValueFormat, Values, array_parts, decode_array

_ALL = bytes([MODE_ALL])


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
        add = False
    elif spec.kind == "sparse" and spec.dtype is DType.F32 and spec.values is not None:
        add = True
    else:
        return False
    width = spec.dtype.itemsize
    if flat.nbytes != spec.numel * width:
        return False
    positions = reader.section(index, "positions")
    if positions[:1] == _ALL:  # every position: nothing to decode, the decoded path is as fast
        return False
    values = _values(reader, index, spec, width)
    try:
        # The kernel reads the position section's header itself: parsing it in Python
        # costs more than decoding a small entry.
        done: bool = native.patch_section(
            positions,
            spec.count,
            spec.numel,
            flat,
            values.raw,
            values.packed,
            values.mask,
            width,
            add,
        )
    except native.DecodeError as exc:
        raise DiffFormatError(str(exc)) from None
    return done


def _values(reader: DiffReader, index: int, spec: EntrySpec, width: int) -> ArrayParts:
    """The bytes the kernel applies: the section's own (decompressed) bytes for XOR
    patterns and f32 deltas; other delta formats widened to binary32 first, by the numpy
    code that defines them."""
    if spec.kind == "exact":
        assert spec.codec is not None
        return array_parts(reader.section(index, "xor"), spec.codec, spec.count, width)
    vs = spec.values
    assert vs is not None
    if vs.format is ValueFormat.F32:
        return array_parts(reader.section(index, "values"), vs.codec, spec.count, width)
    data = decode_array(reader.section(index, "values"), vs.codec, vs.format.storage, spec.count)
    with np.errstate(over="ignore", invalid="ignore"):  # i8 times scale may overflow: defined
        widened = Values(vs.format, data, vs.scale).widened()
    return ArrayParts(-1, np.ascontiguousarray(widened, dtype=np.float32).data, b"")
