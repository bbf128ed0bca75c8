"""Greedy and lexicon-constrained CTC decoding on hand-made log-probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from asr.decode import Lexicon, collapse, greedy_decode, lexicon_decode

ALPHABET = " abcdefghijklmnopqrstuvwxyz'"


def _frames(spec: list[dict[str, float]]) -> np.ndarray:
    """One frame per dict of {char: probability}; '_' is blank; the rest share what is left."""
    vocab = len(ALPHABET) + 1
    rows = []
    for probs in spec:
        row = np.full(vocab, 0.0)
        for char, p in probs.items():
            row[0 if char == "_" else ALPHABET.index(char) + 1] = p
        rest = max(1e-6, 1.0 - row.sum())
        row[row == 0] = rest / max(1, int((row == 0).sum()))
        rows.append(np.log(row / row.sum()))
    return np.array(rows)


def _spell(text: str, p: float = 0.9) -> list[dict[str, float]]:
    """Each character for one frame, a blank frame between characters."""
    out: list[dict[str, float]] = [{"_": p}]
    for char in text:
        out += [{char: p}, {"_": p}]
    return out


def test_collapse_merges_repeats_and_drops_blanks() -> None:
    ids = [0, 3, 3, 0, 3, 1, 1, 0, 1, 4]  # b b _ b ' ' ' ' _ ' ' c
    assert collapse(ids, ALPHABET) == "bb c"
    assert collapse([], ALPHABET) == ""
    assert collapse([1, 0, 2, 1], ALPHABET) == "a"  # leading/trailing spaces trimmed


def test_greedy() -> None:
    assert greedy_decode(_frames(_spell("call mom")), ALPHABET) == "call mom"
    # A doubled letter survives only with a blank between its frames.
    assert greedy_decode(_frames([{"l": 0.9}, {"l": 0.9}]), ALPHABET) == "l"
    assert greedy_decode(_frames([{"l": 0.9}, {"_": 0.9}, {"l": 0.9}]), ALPHABET) == "ll"


def test_lexicon_agrees_with_greedy_on_lexicon_words() -> None:
    lexicon = Lexicon(["call", "mom", "dad"])
    lp = _frames(_spell("call mom"))
    assert lexicon_decode(lp, ALPHABET, lexicon) == "call mom"


def test_lexicon_repairs_a_letter() -> None:
    # Greedy hears "tumer"; the second best letter in that frame is "i".
    spec = _spell("set a timer")
    index = 1 + 2 * "set a timer".index("i")
    spec[index] = {"u": 0.5, "i": 0.4}
    lp = _frames(spec)
    assert greedy_decode(lp, ALPHABET) == "set a tumer"
    lexicon = Lexicon(["set", "a", "timer", "tuner"])
    assert lexicon_decode(lp, ALPHABET, lexicon) == "set a timer"


def test_lexicon_rejects_partial_words_at_the_end() -> None:
    # The audio says "cal": the lexicon only knows "call" and "cat".
    spec = _spell("cal")
    spec[-2] = {"l": 0.6, "t": 0.3}
    lp = _frames(spec)
    assert lexicon_decode(lp, ALPHABET, Lexicon(["call", "cat"])) == "cat"


def test_word_scores_break_ties() -> None:
    spec = _spell("cap")
    spec[-2] = {"p": 0.45, "t": 0.45}
    lp = _frames(spec)
    plain = Lexicon(["cap", "cat"])
    favour_cat = Lexicon(["cap", "cat"], scores={"cat": 0.0, "cap": -5.0})
    assert lexicon_decode(lp, ALPHABET, favour_cat) == "cat"
    assert lexicon_decode(lp, ALPHABET, plain) in {"cap", "cat"}


def test_nothing_fits_gives_silence() -> None:
    # All-blank is always a lexicon transcript: words the lexicon lacks are dropped,
    # never spelled out.
    lp = _frames(_spell("xyz"))
    assert greedy_decode(lp, ALPHABET) == "xyz"
    assert lexicon_decode(lp, ALPHABET, Lexicon(["call"]), token_threshold=-3.0) == ""


def test_lexicon_rejects_bad_words() -> None:
    with pytest.raises(ValueError, match="not a word"):
        Lexicon(["two words"])
