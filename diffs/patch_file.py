"""Applying a chain of diffs to a safetensors model *file*, as a device does.

The base file is never touched. The result is built in a temporary file beside
``out_path`` and renamed into place only after every digest checked:

- **In place** (every entry keeps its tensor's dtype and shape -- sparse, hashed, exact):
  the base is copied (by the kernel, no user-space buffer), the copy is memory-mapped
  writable and each entry is decoded and scattered into it, tensor by tensor. Peak memory
  is one decoded entry, whatever the model's size.
- **Rewrite** (some entry adds, removes or reshapes a tensor): the result is streamed
  tensor by tensor from the memory-mapped base through :func:`diffs.chain.walk_chain`.

Either way the base digest, every intermediate digest and the final digest are checked.
"""

from __future__ import annotations

import mmap
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy.typing as npt

from diffs.chain import StepIndex, Update, check_links, layouts_after, walk_chain
from diffs.container import DiffReader
from diffs.digest import model_file_digest
from diffs.direct import patch_direct
from diffs.entries import (
    ExactEntry,
    HashedEntry,
    InPlaceEntry,
    SparseEntry,
    check_fits,
    patch_in_place,
)
from diffs.errors import BaseMismatchError, TargetMismatchError
from diffs.fileio import atomic_output, fsync_directory
from diffs.limits import DEFAULT_LIMITS, DecodeLimits
from diffs.model import ModelFile, array_bytes
from diffs.safetensors_file import TensorLayout, write_safetensors

Progress = Callable[[int, int], None]
"""Called with (entries done, entries in all) as an apply advances."""


def open_chain(
    paths: Sequence[str | os.PathLike[str]], limits: DecodeLimits = DEFAULT_LIMITS
) -> list[DiffReader]:
    readers: list[DiffReader] = []
    try:
        for path in paths:
            readers.append(DiffReader(path, limits))
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return readers


def apply_to_file(
    base_path: str | os.PathLike[str],
    updates: Sequence[Update],
    out_path: str | os.PathLike[str],
    *,
    base_digest: str | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
    progress: Progress | None = None,
) -> str:
    """Write the model after ``updates`` to ``out_path``; return its canonical digest.

    ``base_digest``, when the caller already knows it (a device that verified its model),
    skips re-hashing the base. On any error nothing is written at ``out_path``.
    """
    with ModelFile(base_path, limits=limits) as base:
        actual = base_digest if base_digest is not None else model_file_digest(base, release=True)
        if not updates:
            raise ValueError("an empty chain has nothing to apply")
        if updates[0].base_digest != actual:
            raise BaseMismatchError(
                f"the diff applies to {updates[0].base_digest}, the model is {actual}",
                expected=updates[0].base_digest,
                actual=actual,
            )
        check_links(actual, updates)
        steps = [StepIndex.of(u) for u in updates]
        in_place = all(
            kind in ("sparse", "hashed", "exact") for s in steps for kind, _, _ in s.kinds.values()
        )
        if not in_place:
            _rewrite(base, updates, steps, Path(out_path), actual)
            return updates[-1].target_digest
    _patch_copy(Path(base_path), steps, Path(out_path), limits, progress)
    return updates[-1].target_digest


def _patch_copy(
    base_path: Path,
    steps: Sequence[StepIndex],
    out_path: Path,
    limits: DecodeLimits,
    progress: Progress | None,
) -> None:
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.incomplete")
    try:
        shutil.copyfile(base_path, tmp)
        total = sum(len(s.positions) for s in steps)
        done = 0
        with ModelFile(tmp, writable=True, limits=limits) as work:
            for number, step in enumerate(steps, 1):
                for index in step.positions.values():
                    if isinstance(step.update, DiffReader):
                        patch_tensor_from(work, step.update, index)
                    else:
                        entry = step.update.entries[index]
                        assert isinstance(entry, SparseEntry | HashedEntry | ExactEntry)
                        patch_tensor(work, entry)
                    done += 1
                    if progress is not None:
                        progress(done, total)
                got = model_file_digest(work, release=True)
                if got != step.update.target_digest:
                    raise TargetMismatchError(
                        f"diff {number} of the chain declares target {step.update.target_digest}, "
                        f"applying it gave {got}",
                        expected=step.update.target_digest,
                        actual=got,
                    )
            work.flush()
        os.replace(tmp, out_path)
        fsync_directory(out_path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def patch_tensor(work: ModelFile, entry: InPlaceEntry) -> None:
    """Apply one decoded in-place entry to its tensor in a writable model file.

    When the entry will write to most of the tensor's pages, they are mapped writable up
    front in one call rather than faulted in one by one; afterwards they are unmapped
    from this process (the file keeps the data), so resident memory follows one tensor.
    """
    tensor = check_fits(entry, work.get(entry.name))
    flat = tensor.array.reshape(-1)  # a view of the writable mapping
    if _writes_most_pages(entry.kind, _changed(entry), flat.nbytes):
        work.prefault_for_write(entry.name)
    patch_in_place(flat, tensor.dtype, entry)
    work.release(entry.name)


def patch_tensor_from(work: ModelFile, reader: DiffReader, index: int) -> None:
    """:func:`patch_tensor` for entry ``index`` of a diff file: applied straight from its
    sections where the compiled kernel covers it (:mod:`diffs.direct`), else decoded
    first (and freed before the next entry decodes: peak memory is one entry)."""
    spec = reader.specs[index]
    tensor = check_fits(spec, work.get(spec.name))
    flat = tensor.array.reshape(-1)
    if _writes_most_pages(spec.kind, spec.count, flat.nbytes):
        work.prefault_for_write(spec.name)
    patch_flat_from(reader, index, flat)
    work.release(spec.name)


def patch_flat_from(reader: DiffReader, index: int, flat: npt.NDArray[Any]) -> None:
    """Apply in-place entry ``index`` to ``flat``, the flat storage of the tensor it was
    checked to fit: straight from the sections, or decoded first."""
    if not patch_direct(reader, index, flat):
        entry = reader.entry(index)
        assert isinstance(entry, SparseEntry | HashedEntry | ExactEntry)
        patch_in_place(flat, entry.dtype, entry)


def _changed(entry: InPlaceEntry) -> int:
    return 0 if isinstance(entry, HashedEntry) else int(entry.positions.size)


def _writes_most_pages(kind: str, count: int, nbytes: int) -> bool:
    """Whether an entry is expected to write to most (~86%+) pages of its tensor: hashed
    entries write every element; ``count`` uniformly spread positions over ``P`` pages
    leave about ``exp(-count / P)`` of them untouched, so ``count >= 2 P``. (Populating
    pages that are never written would only dirty them.)"""
    if kind == "hashed":
        return True
    pages = -(-nbytes // mmap.PAGESIZE)
    return count >= 2 * pages


def _rewrite(
    base: ModelFile,
    updates: Sequence[Update],
    steps: Sequence[StepIndex],
    out_path: Path,
    digest: str,
) -> None:
    final = layouts_after(base, steps)[-1]
    walk = walk_chain(base, updates, base_digest=digest)

    def write_data(layout: TensorLayout, out: BinaryIO) -> None:
        name, _, tensor = next(walk)
        while tensor is None:
            name, _, tensor = next(walk)
        assert name == layout.name
        out.write(array_bytes(tensor.array))

    with atomic_output(out_path) as out:
        write_safetensors(out, final.values(), write_data)
        for _ in walk:  # tensors removed at the end of the name order; digests checked last
            pass
