"""The position -> (bucket, sign) map of hashed diffs (HashedNets), fully specified.

For element ``i`` (row-major flat index, u64) of a tensor, seed ``s`` (u64) and ``K``
buckets (1 <= K < 2**32), all arithmetic modulo 2**64::

    x = s XOR (i * 0x9E3779B97F4A7C15)
    x = x XOR (x >> 30);  x = x * 0xBF58476D1CE4E5B9
    x = x XOR (x >> 27);  x = x * 0x94D049BB133111EB
    x = x XOR (x >> 31)                      # the SplitMix64 finalizer
    bucket(i) = ((x >> 32) * K) >> 32        # multiply-shift range reduction
    sign(i)   = +1 if (x & 1) == 0 else -1

The device regenerates the map from ``(s, K)``; nothing about positions is sent.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
CHUNK = 1 << 20
"""Elements hashed at once: bounds the working memory of hashed entries."""


def bucket_and_sign(
    seed: int, start: int, stop: int, buckets: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Buckets and negative-sign flags for flat indices ``start..stop-1``."""
    x = np.arange(start, stop, dtype=np.uint64)
    x *= _GOLDEN
    x ^= np.uint64(seed)
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    negative = (x & np.uint64(1)).astype(np.bool_)
    x >>= np.uint64(32)
    x *= np.uint64(buckets)
    x >>= np.uint64(32)
    return x.view(np.int64), negative
