"""Canary bundles: a few speech clips, their transcripts and a word error rate bound.

A release may carry a canary bundle. Before a device switches to the release's model it
decodes the clips with the staged model and refuses the model if the pooled word error
rate is above the bound (see ``docs/canary.md``). This module is the bundle's format --
numpy only, no torch -- shared by the server (which validates an upload completely
before storing it), the device agent (which reads what it downloaded) and
:mod:`asr.canary` (which builds bundles and scores models on them).

A bundle is a safetensors file, read with :func:`~diffs.safetensors_file.parse_header`
under the caps of :class:`CanaryLimits`, so every declared size is checked before
anything of that size is allocated:

- one tensor per clip: 1-D ``I16``, 16 kHz mono PCM, at least one sample, named
  ``[A-Za-z0-9._-]{1,64}``;
- ``__metadata__``, exactly these keys:

  ``format``       ``diffcast-canary-v1``
  ``sample_rate``  ``16000``
  ``max_wer``      the bound: a decimal number >= 0 (``0.3``, ``1.5``, ``1e-05``)
  ``transcripts``  a JSON object mapping each clip's name to its reference transcript
                   (non-empty, no control characters)
  ``decoder``      optional: a JSON object saying how to run the model on the clips;
                   opaque here (:mod:`asr.canary` writes and reads it)

Every failure to read or write a bundle is a :class:`~diffs.errors.CanaryFormatError`.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from diffs.dtypes import DType
from diffs.errors import CanaryFormatError, DiffError
from diffs.limits import DecodeLimits
from diffs.model import Tensor, save_model
from diffs.safetensors_file import SafetensorsHeader, parse_header

FORMAT = "diffcast-canary-v1"
SAMPLE_RATE = 16_000
KEYS = frozenset({"format", "sample_rate", "max_wer", "transcripts", "decoder"})
_CLIP_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DECIMAL = re.compile(r"[0-9]{1,20}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?")


@dataclass(frozen=True)
class CanaryLimits:
    """Upper bounds on what reading (or writing) one bundle may involve."""

    max_file_bytes: int = 64 * 1024 * 1024
    """Largest bundle file (about 33 minutes of audio)."""
    max_header_bytes: int = 1024 * 1024
    """Largest safetensors JSON header: clip entries, transcripts and decoder together."""
    max_clips: int = 256
    max_clip_samples: int = 30 * SAMPLE_RATE
    """Longest clip (30 s)."""
    max_transcript_chars: int = 1000
    max_decoder_bytes: int = 64 * 1024
    """Largest ``decoder`` metadata value (its JSON text)."""

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_header_bytes=self.max_header_bytes,
            max_tensors=self.max_clips,
            max_ndim=1,
            max_tensor_elements=self.max_clip_samples,
        )


DEFAULT_LIMITS = CanaryLimits()


@dataclass(frozen=True, eq=False)  # compared by identity: numpy arrays have no truth value
class CanaryClip:
    name: str
    transcript: str
    audio: npt.NDArray[np.int16]
    """16 kHz mono PCM."""

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass(frozen=True, eq=False)
class CanaryBundle:
    clips: tuple[CanaryClip, ...]
    """In the canonical (name) order."""
    max_wer: float
    """A model whose pooled WER on the clips is above this is refused."""
    decoder: dict[str, Any] | None = None

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.clips)

    @property
    def words(self) -> int:
        return sum(len(c.transcript.split()) for c in self.clips)


def read_canary(
    path: str | os.PathLike[str], limits: CanaryLimits = DEFAULT_LIMITS
) -> CanaryBundle:
    """Read and validate the bundle at ``path`` (:class:`CanaryFormatError` if it is not one).

    Memory stays within ``limits.max_file_bytes`` plus the header cap, whatever the file
    declares.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limits.max_file_bytes:
            raise CanaryFormatError(
                f"the bundle is {size} bytes, above the cap of {limits.max_file_bytes}"
            )
        try:
            header = parse_header(handle, size, limits.decode_limits())
        except DiffError as exc:
            raise CanaryFormatError(f"not a valid canary bundle: {exc}") from None
        metadata = _parse_metadata(header.metadata, limits)
        clips = _read_clips(handle, header, metadata.transcripts, limits)
    return CanaryBundle(clips, metadata.max_wer, metadata.decoder)


def write_canary(
    path: str | os.PathLike[str],
    clips: Sequence[CanaryClip],
    max_wer: float,
    decoder: Mapping[str, Any] | None = None,
    limits: CanaryLimits = DEFAULT_LIMITS,
) -> CanaryBundle:
    """Write a bundle atomically, then read it back (so whatever is written is valid).

    Raises :class:`CanaryFormatError` for input the format cannot hold; nothing is left
    at ``path`` then.
    """
    check_bound(max_wer)
    transcripts: dict[str, str] = {}
    model: dict[str, Tensor] = {}
    for clip in clips:
        audio = np.asarray(clip.audio)
        if audio.dtype != np.int16 or audio.ndim != 1:
            raise CanaryFormatError(f"clip {clip.name!r}: audio must be 1-D int16 PCM")
        if clip.name in model:
            raise CanaryFormatError(f"clip {clip.name!r} appears twice")
        _check_clip(clip.name, clip.transcript, audio.size, limits)
        transcripts[clip.name] = clip.transcript
        model[clip.name] = Tensor.of(audio)
    if not model:
        raise CanaryFormatError("a bundle needs at least one clip")
    metadata = {
        "format": FORMAT,
        "sample_rate": str(SAMPLE_RATE),
        "max_wer": repr(float(max_wer)),
        "transcripts": json.dumps(transcripts, sort_keys=True, ensure_ascii=False),
    }
    if decoder is not None:
        metadata["decoder"] = json.dumps(dict(decoder), sort_keys=True, separators=(",", ":"))
    target = Path(path)
    try:
        save_model(target, model, metadata)
    except DiffError as exc:
        raise CanaryFormatError(f"cannot write the bundle: {exc}") from None
    try:
        return read_canary(target, limits)
    except CanaryFormatError:
        target.unlink(missing_ok=True)
        raise


def check_bound(value: float) -> float:
    """``value`` if it is a usable WER bound (finite, >= 0); else :class:`CanaryFormatError`."""
    usable = isinstance(value, int | float) and not isinstance(value, bool)
    if not (usable and math.isfinite(value) and value >= 0):
        raise CanaryFormatError(f"the WER bound must be a finite number >= 0, not {value!r}")
    return float(value)


# --- reading --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Metadata:
    max_wer: float
    transcripts: dict[str, str]
    decoder: dict[str, Any] | None


def _parse_metadata(raw: Mapping[str, str], limits: CanaryLimits) -> _Metadata:
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise CanaryFormatError(f"unknown metadata keys {unknown[:5]}")
    if raw.get("format") != FORMAT:
        raise CanaryFormatError(f"metadata 'format' is {raw.get('format')!r}, not {FORMAT!r}")
    if raw.get("sample_rate") != str(SAMPLE_RATE):
        raise CanaryFormatError(
            f"metadata 'sample_rate' is {raw.get('sample_rate')!r}; clips must be {SAMPLE_RATE} Hz"
        )
    bound = raw.get("max_wer", "")
    if _DECIMAL.fullmatch(bound) is None:
        raise CanaryFormatError(f"metadata 'max_wer' is {bound[:40]!r}, not a decimal number")
    max_wer = check_bound(float(bound))
    transcripts = _json_object(raw.get("transcripts"), "transcripts")
    if not all(isinstance(v, str) for v in transcripts.values()):
        raise CanaryFormatError("every transcript must be a string")
    decoder = None
    if "decoder" in raw:
        if len(raw["decoder"].encode()) > limits.max_decoder_bytes:
            raise CanaryFormatError(
                f"metadata 'decoder' is above the cap of {limits.max_decoder_bytes} bytes"
            )
        decoder = _json_object(raw["decoder"], "decoder")
    return _Metadata(max_wer, transcripts, decoder)


def _json_object(text: str | None, key: str) -> dict[str, Any]:
    if text is None:
        raise CanaryFormatError(f"metadata '{key}' is missing")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:  # ValueError: also ints of > 4300 digits
        raise CanaryFormatError(f"metadata '{key}' is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CanaryFormatError(f"metadata '{key}' is not a JSON object")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise CanaryFormatError(f"duplicate key {key[:64]!r} in metadata JSON")
        result[key] = value
    return result


def _read_clips(
    handle: BinaryIO, header: SafetensorsHeader, transcripts: dict[str, str], limits: CanaryLimits
) -> tuple[CanaryClip, ...]:
    if not header.tensors:
        raise CanaryFormatError("the bundle holds no clip")
    missing = sorted(set(header.tensors) - set(transcripts))
    extra = sorted(set(transcripts) - set(header.tensors))
    if missing or extra:
        raise CanaryFormatError(
            f"transcripts do not match the clips: missing for {missing[:5]}, "
            f"without a clip {[e[:64] for e in extra[:5]]}"
        )
    clips = []
    for name, info in header.tensors.items():
        if info.dtype is not DType.I16 or len(info.shape) != 1:
            raise CanaryFormatError(
                f"clip {name[:64]!r} is {info.dtype.value} {list(info.shape)}: "
                "clips are 1-D I16 PCM"
            )
        _check_clip(name, transcripts[name], info.numel, limits)
        handle.seek(info.begin)
        data = handle.read(info.nbytes)
        if len(data) != info.nbytes:
            raise CanaryFormatError(f"clip {name!r}: the file ended early")
        audio: npt.NDArray[np.int16] = np.frombuffer(data, dtype=DType.I16.storage)
        clips.append(CanaryClip(name, transcripts[name], audio))
    return tuple(clips)


def _check_clip(name: str, transcript: object, samples: int, limits: CanaryLimits) -> None:
    if _CLIP_NAME.fullmatch(name) is None:
        raise CanaryFormatError(f"clip name {name[:64]!r} is not [A-Za-z0-9._-]{{1,64}}")
    if not 1 <= samples <= limits.max_clip_samples:
        raise CanaryFormatError(
            f"clip {name!r} has {samples} samples; 1 to {limits.max_clip_samples} are allowed"
        )
    if not isinstance(transcript, str) or not transcript.strip():
        raise CanaryFormatError(f"clip {name!r}: the transcript is empty")
    if len(transcript) > limits.max_transcript_chars:
        raise CanaryFormatError(
            f"clip {name!r}: the transcript is above {limits.max_transcript_chars} characters"
        )
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in transcript):
        raise CanaryFormatError(f"clip {name!r}: the transcript holds control characters")
