"""Applying a sparse or exact entry straight from its encoded sections.

What a device does most is patch such entries into the tensors of a model file. Decoding
an entry first (:meth:`diffs.container.DiffReader.entry`) builds ``k`` int64 positions
and ``k`` values in memory, then scatters them: three passes over memory and two
``k``-sized buffers whose fresh pages the kernel must fault in. The compiled kernel
``rice_patch`` instead decodes positions a few thousand at a time into a small buffer and
applies each value from the section's bytes (or byte planes) as it goes.

It covers exact entries (XOR, any dtype) and sparse entries of F32 tensors with f32
values; everything else, and every process without the compiled kernels, takes the
decoded path. Both check every stream before their first write, so a bad entry leaves
the tensor as it was, and both give the same bits (``tests/diffs/test_kernels.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from diffs.container import DiffReader
from diffs.dtypes import DType
from diffs.kernels import native
from diffs.positions import native_errors, rice_streams
from diffs.values import Codec, ValueFormat, array_bytes


def patch_direct(reader: DiffReader, index: int, flat: npt.NDArray[Any]) -> bool:
    """Apply entry ``index`` of ``reader`` to ``flat``, the flat storage of the tensor it
    was checked to fit; ``False``, with nothing done, where the kernel does not cover it.

    Raises :class:`diffs.errors.DiffFormatError` (nothing written) on bad streams.
    """
    if native is None or not (flat.flags.c_contiguous and flat.flags.writeable):
        return False
    spec = reader.specs[index]
    if spec.kind == "exact" and spec.codec is not None:
        codec, part, add = spec.codec, "xor", False
        target = flat.view(spec.dtype.bits)
    elif (
        spec.kind == "sparse"
        and spec.dtype is DType.F32
        and spec.values is not None
        and spec.values.format is ValueFormat.F32
    ):
        codec, part, add = spec.values.codec, "values", True
        target = flat.view(np.float32)
    else:
        return False
    if target.size != spec.numel:
        return False
    streams = rice_streams(reader.section(index, "positions"), spec.count, spec.numel)
    if streams is None:  # every position: nothing to decode, the decoded path is as fast
        return False
    width = target.itemsize
    values = array_bytes(reader.section(index, part), codec, spec.count * width)
    with native_errors():
        native.rice_patch(
            streams.unary,
            streams.params,
            streams.block_log2,
            streams.remainders,
            spec.count,
            spec.numel,
            target,
            values,
            width,
            codec is Codec.SHUFFLE,
            add,
        )
    return True
