"""Canary checks with the reference model: bundles built from the corpus, models scored.

A canary bundle (:mod:`diffs.canary`) holds clips, transcripts and a WER bound; its
``decoder`` metadata says how to run a model on the clips. This module writes and reads
that ``decoder`` as ``{"kind": "asr-ctc-greedy", "model": <ModelConfig JSON>}``: the
architecture the weights belong to (a device holds only the weights). :func:`score`
decodes every clip greedily with the model in a safetensors file and pools the WER.

The device agent imports this module lazily, only when a plan carries a canary, so a
device without torch still runs the agent.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from asr import CheckpointError
from asr.corpus import CorpusStore
from asr.decode import greedy_decode
from asr.metrics import error_rates
from asr.model import CTCModel, ModelConfig, load_weights, log_probs
from diffs.canary import SAMPLE_RATE, CanaryBundle, CanaryClip, write_canary
from diffs.errors import DiffError
from diffs.model import ModelFile

DECODER_KIND = "asr-ctc-greedy"
MAX_N_FFT = 8192
MAX_N_MELS = 1024
MAX_BLOCKS = 256
"""The feature settings and the block count are not bounded by the weights' shapes
(the model is built, on the meta device, before they can be compared); these bound them."""


@dataclass(frozen=True)
class CanaryScore:
    wer: float
    """Pooled: word edits over reference words, all clips together."""
    words: int
    word_errors: int
    clips: int
    hypotheses: tuple[str, ...]
    """The greedy transcript of each clip, in the bundle's order."""


def decoder_spec(config: ModelConfig) -> dict[str, Any]:
    """The bundle's ``decoder`` metadata for models of ``config``."""
    return {"kind": DECODER_KIND, "model": config.to_json()}


def decoder_config(bundle: CanaryBundle) -> ModelConfig:
    """The model configuration a bundle's ``decoder`` names (:class:`CheckpointError`)."""
    spec = bundle.decoder
    if (
        not isinstance(spec, dict)
        or spec.get("kind") != DECODER_KIND
        or not isinstance(spec.get("model"), dict)
    ):
        raise CheckpointError(
            f"the canary bundle does not name an {DECODER_KIND!r} decoder with a model config"
        )
    config = ModelConfig.from_json(spec["model"])
    features = config.features
    numbers = (features.n_fft, features.win_length, features.hop_length, features.n_mels)
    if not (
        all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)
        and 0 < features.hop_length <= features.win_length <= features.n_fft <= MAX_N_FFT
        and 0 < features.n_mels <= MAX_N_MELS
        and features.sample_rate == SAMPLE_RATE
        and isinstance(config.blocks, int)
        and 0 <= config.blocks <= MAX_BLOCKS
        and isinstance(config.alphabet, str)
    ):
        raise CheckpointError("the canary's decoder has unusable feature settings or block count")
    return config


def corpus_clips(store: CorpusStore, split: str, count: int) -> list[CanaryClip]:
    """The first ``count`` utterances of a corpus split as canary clips."""
    return [
        CanaryClip(f"clip-{index:04d}", u.text, np.ascontiguousarray(u.audio, dtype=np.int16))
        for index, u in enumerate(store.load(split)[:count])
    ]


def build_canary(
    path: str | os.PathLike[str],
    clips: Sequence[CanaryClip],
    max_wer: float,
    config: ModelConfig,
) -> CanaryBundle:
    """Write a bundle of ``clips`` for models of ``config``; returns it as read back."""
    return write_canary(path, clips, max_wer, decoder_spec(config))


def load_for_canary(model_path: str | os.PathLike[str], config: ModelConfig) -> CTCModel:
    """The model in ``model_path`` built with ``config``, once its tensors' names and
    shapes are checked against the config without allocating anything (on the meta
    device): a config that does not fit the weights is a :class:`CheckpointError`,
    never a large allocation."""
    try:
        with torch.device("meta"):
            skeleton = CTCModel(config)
    except Exception as exc:  # whatever the layers make of nonsense, it is a bad config
        raise CheckpointError(f"the canary's model config is not usable: {exc}") from None
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    try:
        with ModelFile(model_path) as weights:
            found = {name: info.shape for name, info in weights.infos.items()}
    except (DiffError, OSError) as exc:
        raise CheckpointError(f"cannot read {model_path}: {exc}") from None
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or sorted(
            n for n in found if found[n] != expected[n]
        )
        raise CheckpointError(
            f"the model does not fit the canary's model config (first differences: {differ[:3]})"
        )
    return load_weights(model_path, config)


def score(model_path: str | os.PathLike[str], bundle: CanaryBundle) -> CanaryScore:
    """Greedy-decode every clip with the model in ``model_path``; the pooled WER.

    Transcripts and hypotheses are compared word for word, case-insensitively.
    """
    config = decoder_config(bundle)
    model = load_for_canary(model_path, config)
    outputs = log_probs(model, [clip.audio for clip in bundle.clips])
    hypotheses = [greedy_decode(lp, config.alphabet) for lp in outputs]
    references = [" ".join(clip.transcript.lower().split()) for clip in bundle.clips]
    rates = error_rates(references, hypotheses)
    return CanaryScore(
        wer=rates.wer,
        words=rates.words,
        word_errors=rates.word_errors,
        clips=len(bundle.clips),
        hypotheses=tuple(hypotheses),
    )
