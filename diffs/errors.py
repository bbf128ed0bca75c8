"""The one exception tree of the ``diffs`` package.

Every failure the package can report is a subclass of :class:`DiffError`; callers catch
that root (or a precise leaf) and never see a bare ``ValueError``, ``KeyError`` or a
third-party exception::

    DiffError
    ├── ModelFormatError          a model file (safetensors) is malformed or unsupported
    ├── DiffFormatError           a diff file is malformed, truncated or inconsistent
    │   └── LimitExceededError    a declared size passes a decoding cap (checked before allocating)
    ├── IncompatibleModelError    a diff entry does not fit the model (missing tensor, dtype, shape)
    ├── CanaryFormatError         a canary bundle is malformed, inconsistent or over a cap
    └── DigestMismatchError       a model's canonical digest is not the expected one
        ├── BaseMismatchError     the model a diff is applied to is not the diff's base
        └── TargetMismatchError   the result of applying a diff is not the declared target
"""

from __future__ import annotations


class DiffError(Exception):
    """Root of every error raised by ``diffs``."""


class ModelFormatError(DiffError):
    """A model file is not a valid safetensors file, or holds an unsupported tensor."""


class DiffFormatError(DiffError):
    """A diff file is malformed, truncated, or internally inconsistent."""


class LimitExceededError(DiffFormatError):
    """A declared size (header, tensor count, elements, decoded bytes) exceeds a decoding cap."""


class IncompatibleModelError(DiffError):
    """A diff entry names a tensor the model lacks, or whose dtype or shape differs."""


class CanaryFormatError(DiffError):
    """A canary bundle (:mod:`diffs.canary`) is malformed, inconsistent or over a cap."""


class DigestMismatchError(DiffError):
    """A model's canonical digest differs from the one expected."""

    def __init__(self, message: str, *, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class BaseMismatchError(DigestMismatchError):
    """The model a diff is applied to does not have the diff's base digest."""


class TargetMismatchError(DigestMismatchError):
    """Applying a diff did not give the diff's declared target digest."""
