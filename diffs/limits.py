"""Caps that bound what decoding a file may allocate.

Every size a file declares is checked against these caps *before* anything of that size
is allocated, so a hostile file costs at most the caps, never an unbounded allocation.
The caps are passed explicitly (there are no module-level globals to tweak).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds applied while parsing models and diffs."""

    max_header_bytes: int = 16 * 1024 * 1024
    """Largest JSON header of a safetensors file (model or diff)."""
    max_tensors: int = 100_000
    """Most tensors in a model, and most entries in a diff."""
    max_ndim: int = 8
    """Most dimensions of one tensor."""
    max_tensor_elements: int = 1 << 33
    """Most elements of one tensor (8 Gi)."""
    max_decoded_bytes: int = 1 << 34
    """Most bytes all sections of one diff may decode to, together (16 GiB)."""
    max_hash_buckets: int = 1 << 26
    """Most buckets of one hashed entry."""


DEFAULT_LIMITS = DecodeLimits()
