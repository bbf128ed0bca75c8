"""Word and character error rates (jiwer), overall and per cohort.

Rates are pooled, not averaged: a group's WER is its total word edits (substitutions +
deletions + insertions) over its total reference words, so long utterances weigh more.
CER counts characters of the space-joined text, spaces included (jiwer's definition).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import jiwer

ALL = "all"
"""The group name of every utterance together."""


@dataclass(frozen=True)
class ErrorRates:
    utterances: int
    words: int
    word_errors: int
    chars: int
    char_errors: int

    @property
    def wer(self) -> float:
        return self.word_errors / self.words if self.words else 0.0

    @property
    def cer(self) -> float:
        return self.char_errors / self.chars if self.chars else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "wer": self.wer, "cer": self.cer}


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorRates:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        return ErrorRates(0, 0, 0, 0, 0)
    words = jiwer.process_words(list(references), list(hypotheses))
    chars = jiwer.process_characters(list(references), list(hypotheses))
    return ErrorRates(
        utterances=len(references),
        words=words.hits + words.substitutions + words.deletions,
        word_errors=words.substitutions + words.deletions + words.insertions,
        chars=chars.hits + chars.substitutions + chars.deletions,
        char_errors=chars.substitutions + chars.deletions + chars.insertions,
    )


def error_rates_by(
    references: Sequence[str], hypotheses: Sequence[str], groups: Sequence[str]
) -> dict[str, ErrorRates]:
    """Error rates per group (e.g. per cohort), plus :data:`ALL`; groups sorted by name."""
    if not len(references) == len(hypotheses) == len(groups):
        raise ValueError("references, hypotheses and groups differ in length")
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    result = {
        group: error_rates([references[i] for i in idx], [hypotheses[i] for i in idx])
        for group, idx in sorted(members.items())
    }
    result[ALL] = error_rates(references, hypotheses)
    return result


def word_recall(
    references: Sequence[str], hypotheses: Sequence[str], words: Iterable[str]
) -> float:
    """Share of the occurrences of ``words`` in the references that the hypotheses hold.

    Counted per utterance as a bag of words (no alignment): an occurrence is recalled if
    the hypothesis holds the word at least as many times. 0.0 when ``words`` never occur.
    """
    targets = set(words)
    found = total = 0
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        wanted = Counter(w for w in reference.split() if w in targets)
        got = Counter(w for w in hypothesis.split() if w in targets)
        total += sum(wanted.values())
        found += sum(min(n, got[w]) for w, n in wanted.items())
    return found / total if total else 0.0
