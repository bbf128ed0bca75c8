"""The compiled kernels of :mod:`diffs._native`, when they were built.

Decoding Rice positions and scattering sparse entries into a tensor are the two loops
that bound how fast a device applies a diff. Both have a numpy implementation -- the
reference, always available -- and a C one, built at install time where a compiler is at
hand (``setup.py``; the install succeeds without it). The two are held bit-identical,
on valid and hostile input alike, by ``tests/diffs/test_kernels.py``.

``DIFFCAST_NATIVE=0`` in the environment makes a process use the numpy code (to compare
the two, or to rule the compiled code out when chasing a problem).
"""

from __future__ import annotations

import os
from types import ModuleType


def _load() -> ModuleType | None:
    if os.environ.get("DIFFCAST_NATIVE", "1") == "0":
        return None
    try:
        from diffs import _native
    except ImportError:
        return None
    return _native


native: ModuleType | None = _load()
"""The compiled module, or ``None`` where the numpy code runs."""


def backend() -> str:
    """``"native"`` or ``"numpy"``: which code decodes and scatters in this process."""
    return "native" if native is not None else "numpy"


def describe() -> str:
    """One line for people: the code in use and, for the compiled kernels, how they
    prefetch the cache lines they will write (chosen by CPU vendor when loaded)."""
    if native is None:
        off = os.environ.get("DIFFCAST_NATIVE") == "0"
        return "numpy (compiled kernels " + (
            "turned off by DIFFCAST_NATIVE=0)" if off else "not built)"
        )
    how = "as each position is decoded" if native.PREFETCH_WHILE_DECODING else "by the CPU alone"
    return f"native (compiled; cache lines to write prefetched {how})"
