"""WER, CER, per-cohort pooling and new-word recall."""

from __future__ import annotations

import pytest

from asr.metrics import ALL, error_rates, error_rates_by, word_recall


def test_wer_and_cer() -> None:
    rates = error_rates(["set a timer", "call mom"], ["set the timer", "call mom now"])
    assert rates.words == 5
    assert rates.word_errors == 2  # one substitution, one insertion
    assert rates.wer == pytest.approx(0.4)
    assert rates.chars == len("set a timer") + len("call mom")
    assert rates.char_errors == 3 + 4  # "a"->"the" (1 sub + 2 ins), " now" (4 ins)
    assert rates.cer == pytest.approx(7 / 19)


def test_empty_hypothesis_counts_deletions() -> None:
    rates = error_rates(["turn on the lights"], [""])
    assert rates.wer == 1.0
    assert rates.cer == 1.0


def test_perfect() -> None:
    rates = error_rates(["stop"], ["stop"])
    assert (rates.wer, rates.cer) == (0.0, 0.0)
    assert error_rates([], []).wer == 0.0


def test_by_cohort_pools_words() -> None:
    refs = ["a b c d", "e f", "g h"]
    hyps = ["a b c d", "e x", "x x"]
    groups = ["en-us", "en-gb", "en-gb"]
    rates = error_rates_by(refs, hyps, groups)
    assert list(rates) == ["en-gb", "en-us", ALL]
    assert rates["en-us"].wer == 0.0
    assert rates["en-gb"].wer == pytest.approx(3 / 4)
    assert rates[ALL].wer == pytest.approx(3 / 8)


def test_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="hypotheses"):
        error_rates(["a"], [])


def test_word_recall() -> None:
    refs = ["call siobhan", "call niamh and siobhan", "call mom"]
    hyps = ["call siobhan", "call neve and siobhan", "call mom"]
    assert word_recall(refs, hyps, ["siobhan", "niamh"]) == pytest.approx(2 / 3)
    assert word_recall(refs, hyps, ["ledecky"]) == 0.0
