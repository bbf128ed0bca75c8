"""The reference on-device ASR model, its synthetic corpus and its WER evaluation.

Modules, from the bottom up: :mod:`asr.corpus` (command grammar, espeak-ng voices and
cohorts, update sets, deterministic cached synthesis), :mod:`asr.features` (log-mel in
torch), :mod:`asr.model` (a small streaming-friendly CTC model and its checkpoint files),
:mod:`asr.decode` (greedy and lexicon-constrained CTC decoding), :mod:`asr.metrics`
(WER/CER per cohort), :mod:`asr.train` (deterministic training) and :mod:`asr.cli`.

Every failure the package reports is a subclass of :class:`ASRError`::

    ASRError
    ├── SynthesisError     espeak-ng is missing, failed, or returned no usable audio
    ├── CorpusError        a corpus cache is missing, incomplete or inconsistent
    ├── CheckpointError    a model checkpoint or its JSON config is missing or malformed
    └── TrainingError      a training request is inconsistent (budget, schedule, data)

``asr`` may import ``diffs``; nothing in ``diffs`` imports ``asr``.
"""

from __future__ import annotations


class ASRError(Exception):
    """Root of every error raised by ``asr``."""


class SynthesisError(ASRError):
    """espeak-ng is missing, failed, or returned no usable audio."""


class CorpusError(ASRError):
    """A corpus cache is missing, incomplete or inconsistent with its configuration."""


class CheckpointError(ASRError):
    """A model checkpoint or its JSON config is missing, malformed or inconsistent."""


class TrainingError(ASRError):
    """A training request is inconsistent: budget, schedule or data."""


__all__ = ["ASRError", "CheckpointError", "CorpusError", "SynthesisError", "TrainingError"]
