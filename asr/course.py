"""Consecutive updates: each teaches one update set's new words on top of the last.

Update ``k`` trains on update set ``k`` (its new words) with a replay pool of old data:
a fixed slice of the base training set plus the training sets of updates ``1..k-1``. Its
base is the model the previous update's *diff* produced on a device (not the trainer's
float weights), so drift accumulates exactly as it would in a fleet.

After each update the model is scored (greedy decoding, so the figure is the model's
own) on the new-word test sets of updates ``1..k`` together (cumulative) and on a slice
of the original test set, per cohort.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asr import TrainingError
from asr.corpus import UPDATE_SETS, CorpusStore, Utterance
from asr.decode import greedy_decode
from asr.difftrain import DiffResult, DiffTrainConfig, train_diff
from asr.metrics import ALL, ErrorRates, error_rates_by
from asr.model import CTCModel, log_probs
from asr.train import Log, TrainData

DEFAULT_UPDATES = tuple(u.name for u in UPDATE_SETS[:5])


@dataclass(frozen=True)
class CourseConfig:
    """Which updates, how much data, and how much of the test sets to score."""

    updates: tuple[str, ...] = DEFAULT_UPDATES
    replay_base: int = 4_000
    """Base training utterances in the replay pool."""
    train_limit: int | None = None
    """Use at most this many training utterances of each update set."""
    old_test: int = 480
    """Utterances of ``base/test`` scored after each update."""
    new_test: int | None = None
    """Utterances of each update's test set scored (``None``: all)."""

    def __post_init__(self) -> None:
        known = {u.name for u in UPDATE_SETS}
        unknown = [name for name in self.updates if name not in known]
        if unknown:
            raise TrainingError(f"unknown update sets {unknown}; known: {sorted(known)}")
        if not self.updates:
            raise TrainingError("a course needs at least one update")

    def splits(self) -> list[str]:
        names = ["base/train", "base/test"]
        for update in self.updates:
            names += [f"{update}/train", f"{update}/test"]
        return names


def score(model: CTCModel, utterances: Sequence[Utterance]) -> dict[str, ErrorRates]:
    """Greedy WER/CER per cohort (and over all, under :data:`asr.metrics.ALL`)."""
    outputs = log_probs(model, [u.audio for u in utterances])
    hypotheses = [greedy_decode(lp, model.config.alphabet) for lp in outputs]
    return error_rates_by(
        [u.text for u in utterances], hypotheses, [u.spec.cohort for u in utterances]
    )


@dataclass
class UpdateRecord:
    index: int
    update: str
    result: DiffResult
    new_words: dict[str, ErrorRates]
    """On the test sets of updates ``1..index`` together."""
    old: dict[str, ErrorRates]

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "update": self.update,
            **self.result.to_json(),
            "new_word_wer": self.new_words[ALL].wer,
            "old_wer": self.old[ALL].wer,
            "new_word_cohorts": {k: v.wer for k, v in self.new_words.items()},
            "old_cohorts": {k: v.wer for k, v in self.old.items()},
        }


class Course:
    """The data of a course, loaded once and shared by every method run on it."""

    def __init__(self, store: CorpusStore, config: CourseConfig) -> None:
        self.config = config
        base_train = store.load("base/train")
        self.replay_base = base_train[: config.replay_base]
        self.old_test = store.load("base/test")[: config.old_test]
        self.train = {u: store.load(f"{u}/train")[: config.train_limit] for u in config.updates}
        self.test = {u: store.load(f"{u}/test")[: config.new_test] for u in config.updates}

    def data(self, index: int) -> TrainData:
        """Update ``index`` (0-based): its own set, replaying base and earlier updates."""
        updates = self.config.updates
        replay = list(self.replay_base)
        for earlier in updates[:index]:
            replay += self.train[earlier]
        return TrainData(self.train[updates[index]], replay)

    def new_word_test(self, index: int) -> list[Utterance]:
        return [u for name in self.config.updates[: index + 1] for u in self.test[name]]

    def run(
        self,
        base: CTCModel,
        config: DiffTrainConfig,
        log: Log = print,
        on_update: Callable[[UpdateRecord], None] | None = None,
    ) -> list[UpdateRecord]:
        """Apply ``config`` to every update in turn; returns one record per update."""
        model, records = base, []
        for index, name in enumerate(self.config.updates):
            started = time.monotonic()
            result = train_diff(model, self.data(index), config, log)
            model = result.model
            record = UpdateRecord(
                index + 1,
                name,
                result,
                score(model, self.new_word_test(index)),
                score(model, self.old_test),
            )
            log(
                f"update {index + 1} ({name}): {result.diff_bytes:,} bytes "
                f"({result.fraction:.2%}), new-word WER {record.new_words[ALL].wer:.2%}, "
                f"old WER {record.old[ALL].wer:.2%}, {time.monotonic() - started:.0f} s"
            )
            records.append(record)
            if on_update is not None:
                on_update(record)
        return records
