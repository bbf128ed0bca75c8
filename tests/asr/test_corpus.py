"""The corpus: grammar, speaker splits, update sets, deterministic synthesis and cache."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from asr import CorpusError
from asr.corpus import (
    ACCENTS,
    BASE_DOMAINS,
    BASE_SLOTS,
    DEV_VARIANTS,
    SAMPLE_RATE,
    TEST_VARIANTS,
    TRAIN_VARIANTS,
    UPDATE_SETS,
    CorpusConfig,
    CorpusStore,
    base_lexicon,
    expand,
    generate,
    number_words,
    parse_wav,
    plan_utterance,
    read_wav,
    resample,
    synthesize,
    vocabulary,
    write_wav,
)
from asr.model import ALPHABET

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
CONFIG = CorpusConfig()


@pytest.mark.parametrize(
    ("n", "words"),
    [(0, "zero"), (7, "seven"), (13, "thirteen"), (40, "forty"), (42, "forty two"),
     (100, "one hundred"), (342, "three hundred forty two"), (999, "nine hundred ninety nine")],
)  # fmt: skip
def test_number_words(n: int, words: str) -> None:
    assert number_words(n) == words


def test_texts_use_only_the_alphabet() -> None:
    words = base_lexicon() | {w for u in UPDATE_SETS for w in u.new_words}
    assert set("".join(words)) <= set(ALPHABET) - {" "}
    for split in CONFIG.splits():
        for index in range(20):
            text = plan_utterance(CONFIG, split, index).text
            assert text == " ".join(text.split()) and text
            assert set(text) <= set(ALPHABET)


def test_base_grammar_is_rich() -> None:
    assert len(BASE_DOMAINS) >= 8
    assert len(base_lexicon()) > 500
    rng = np.random.default_rng(0)
    texts = {
        expand(t, BASE_SLOTS, rng) for _ in range(50) for d in BASE_DOMAINS for t in d.templates
    }
    assert len(texts) > 2500


def test_plan_is_deterministic_and_seeded() -> None:
    assert plan_utterance(CONFIG, "base/train", 17) == plan_utterance(CONFIG, "base/train", 17)
    other = dataclasses.replace(CONFIG, seed=CONFIG.seed + 1)
    texts = [plan_utterance(CONFIG, "base/train", i).text for i in range(30)]
    assert texts != [plan_utterance(other, "base/train", i).text for i in range(30)]
    # A smaller corpus is a prefix of a larger one.
    small = dataclasses.replace(CONFIG, train_size=10)
    assert plan_utterance(small, "base/train", 3) == plan_utterance(CONFIG, "base/train", 3)


def test_speaker_splits_are_disjoint_by_voice() -> None:
    train, dev, test = set(TRAIN_VARIANTS), set(DEV_VARIANTS), set(TEST_VARIANTS)
    assert not train & dev and not train & test and not dev & test
    assert len(train) == len(TRAIN_VARIANTS) and len(test) >= 10
    seen: dict[str, set[str]] = {}
    for split in CONFIG.splits():
        part = split.split("/")[1]
        for index in range(64):
            spec = plan_utterance(CONFIG, split, index)
            seen.setdefault(part, set()).add(spec.speaker.variant)
            assert spec.speaker.accent in ACCENTS
    assert seen["train"] <= train and seen["dev"] <= dev and seen["test"] <= test
    # Every cohort (accent) is in every split, in equal shares.
    cohorts = [plan_utterance(CONFIG, "base/test", i).cohort for i in range(8 * len(ACCENTS))]
    assert {c: cohorts.count(c) for c in ACCENTS} == dict.fromkeys(ACCENTS, 8)


def test_update_sets_bring_only_their_new_words() -> None:
    base = base_lexicon()
    assert len(UPDATE_SETS) >= 5
    assert len({u.name for u in UPDATE_SETS}) == len(UPDATE_SETS)
    all_new: set[str] = set()
    for update in UPDATE_SETS:
        new = set(update.new_words)
        assert len(new) == len(update.new_words) >= 5
        assert not new & base, f"{update.name}: base already has {new & base}"
        assert not new & all_new
        all_new |= new
        assert vocabulary(update.templates, update.slots) - new <= base
        for split in (f"{update.name}/train", f"{update.name}/test"):
            for index in range(40):
                words = set(plan_utterance(CONFIG, split, index).text.split())
                assert words & new, f"{split}/{index} has no new word"


def test_unknown_split() -> None:
    with pytest.raises(CorpusError):
        plan_utterance(CONFIG, "base/holdout", 0)
    with pytest.raises(CorpusError):
        CONFIG.size("olympics/train")


def test_wav_round_trip(tmp_path: Path) -> None:
    audio = (np.arange(-2000, 2000, 7) % 30000).astype(np.int16)
    write_wav(tmp_path / "a.wav", audio)
    rate, back = read_wav(tmp_path / "a.wav")
    assert rate == SAMPLE_RATE
    assert np.array_equal(back, audio)
    # espeak streams a placeholder size: everything after the header is data.
    data = bytearray((tmp_path / "a.wav").read_bytes())
    data[40:44] = b"\x00\xf0\xff\x7f"
    assert np.array_equal(parse_wav(bytes(data))[1], audio)


def test_resample_keeps_a_tone() -> None:
    rate_in, rate_out, hz = 22_050, 16_000, 440.0

    # Faded in and out like speech between silences (the method treats it as periodic).
    def tone(rate: int) -> np.ndarray:
        t = np.arange(rate) / rate
        return np.sin(2 * np.pi * hz * t) * np.minimum(1.0, np.minimum(t, 1 - t) / 0.1)

    y = resample(tone(rate_in), rate_in, rate_out)
    assert len(y) == rate_out
    assert np.max(np.abs(y - tone(rate_out))) < 1e-3
    # A tone above the new Nyquist frequency is removed, not aliased.
    high = np.sin(2 * np.pi * 9_000 * np.arange(rate_in) / rate_in)
    assert np.sqrt(np.mean(resample(high, rate_in, rate_out) ** 2)) < 1e-3


@needs_espeak
def test_synthesis_is_deterministic() -> None:
    for split, index in [("base/train", 0), ("base/test", 5), ("swimmers/test", 2)]:
        spec = plan_utterance(CONFIG, split, index)
        first, second = synthesize(spec), synthesize(spec)
        assert first.dtype == np.int16
        assert first.tobytes() == second.tobytes()
        assert 0.3 * SAMPLE_RATE < len(first) < 12 * SAMPLE_RATE
        assert np.abs(first).max() > 1000  # speech, not silence


def _record(into: list[tuple[int, int]]) -> Callable[[int, int], None]:
    return lambda done, total: into.append((done, total))


@needs_espeak
def test_generate_caches_and_is_reproducible(tmp_path: Path) -> None:
    config = CorpusConfig(
        train_size=3, dev_size=1, test_size=2, update_train_size=1, update_test_size=1,
        shard_size=2,
    )  # fmt: skip
    splits = ["base/train", "base/test"]
    digests = []
    for name in ("a", "b"):
        store = CorpusStore.open(tmp_path / name, config)
        progress: list[tuple[int, int]] = []
        made = generate(store, splits, workers=1, on_progress=_record(progress))
        assert made == 5
        assert progress[-1] == (5, 5)
        assert generate(store, splits, workers=1) == 0  # cached
        utterances = store.load("base/train") + store.load("base/test")
        assert [u.text for u in utterances] == [
            plan_utterance(config, s, i).text for s in splits for i in range(config.size(s))
        ]
        digests.append(hashlib.sha256(b"".join(u.audio.tobytes() for u in utterances)).digest())
    assert digests[0] == digests[1]
    # A larger corpus reuses the shards (the short last one is made again).
    bigger = dataclasses.replace(config, train_size=4)
    store = CorpusStore.open(tmp_path / "a", bigger)
    assert store.missing_shards("base/train") == [1]
    with pytest.raises(CorpusError, match="missing"):
        store.load("base/train")
    assert generate(store, ["base/train"], workers=1) == 2
    # ...and the smaller corpus is served by the longer shard, not made again.
    smaller = CorpusStore.open(tmp_path / "a", config)
    assert smaller.missing_shards("base/train") == []
    assert [u.audio.tobytes() for u in smaller.load("base/train")] == [
        u.audio.tobytes() for u in store.load("base/train")[:3]
    ]
