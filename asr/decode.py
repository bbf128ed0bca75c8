"""CTC decoding: greedy, and a prefix beam search constrained to a lexicon.

Both take one utterance's ``(frames, vocab)`` log-probabilities (numpy, token 0 = blank,
token ``i + 1`` = ``alphabet[i]``) and return text.

- :func:`greedy_decode`: the most likely token per frame, repeats merged, blanks dropped.
- :func:`lexicon_decode`: CTC prefix beam search in which every word must be a word of
  the :class:`Lexicon` (a character trie): a letter may only extend a prefix of a lexicon
  word, and a space may only follow a complete word. Hypotheses end on a complete word.
  An optional per-word score (e.g. a log unigram prior) is added when a word completes.
  Words the lexicon lacks are replaced by lexicon words or dropped, never spelled out
  (the all-blank path, an empty transcript, is always a candidate); only if pruning
  leaves no complete hypothesis at all does it fall back to greedy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

NEG_INF = -math.inf


def collapse(tokens: Iterable[int], alphabet: str) -> str:
    """Merge repeated tokens, drop blanks (0), map the rest through ``alphabet``."""
    out: list[str] = []
    previous = 0
    for token in tokens:
        if token not in (previous, 0):
            out.append(alphabet[token - 1])
        previous = token
    return " ".join("".join(out).split())


def greedy_decode(log_probs: npt.NDArray[Any], alphabet: str) -> str:
    return collapse(np.asarray(log_probs).argmax(axis=-1).tolist(), alphabet)


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    word: str | None = None


class Lexicon:
    """A set of words as a character trie."""

    def __init__(self, words: Iterable[str], scores: Mapping[str, float] | None = None) -> None:
        self.root = _Node()
        self.words: set[str] = set()
        self.scores = dict(scores or {})
        for word in words:
            if not word or " " in word:
                raise ValueError(f"not a word: {word!r}")
            node = self.root
            for char in word:
                node = node.children.setdefault(char, _Node())
            node.word = word
            self.words.add(word)

    def __contains__(self, word: object) -> bool:
        return word in self.words

    def __len__(self) -> int:
        return len(self.words)


def _logaddexp(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


@dataclass
class _Beam:
    blank: float = NEG_INF
    """log P(prefix, path ending in blank)."""
    label: float = NEG_INF
    """log P(prefix, path ending in its last label)."""
    node: _Node | None = None
    """Trie node of the word being spelled (the root right after a space)."""
    bonus: float = 0.0
    """Sum of word scores of the completed words."""

    @property
    def total(self) -> float:
        return _logaddexp(self.blank, self.label)


def lexicon_decode(
    log_probs: npt.NDArray[Any],
    alphabet: str,
    lexicon: Lexicon,
    *,
    beam_size: int = 16,
    token_threshold: float = -12.0,
    word_weight: float = 1.0,
) -> str:
    """Most likely transcript whose words are all in ``lexicon`` (prefix beam search).

    Only tokens with a log-probability above ``token_threshold`` in a frame are tried.
    ``word_weight`` scales ``lexicon.scores`` (added as each word completes).
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    space = alphabet.index(" ") + 1
    beams: dict[tuple[int, ...], _Beam] = {(): _Beam(blank=0.0, node=lexicon.root)}
    for frame in lp:
        candidates = [int(t) for t in np.flatnonzero(frame > token_threshold) if t != 0]
        blank_lp = float(frame[0])
        next_beams: dict[tuple[int, ...], _Beam] = {}
        for prefix, beam in beams.items():
            total = beam.total
            here = next_beams.get(prefix)
            if here is None:
                here = next_beams[prefix] = _Beam(node=beam.node, bonus=beam.bonus)
            here.blank = _logaddexp(here.blank, total + blank_lp)
            last = prefix[-1] if prefix else None
            if last is not None:
                here.label = _logaddexp(here.label, beam.label + float(frame[last]))
            assert beam.node is not None
            for token in candidates:
                char_lp = float(frame[token])
                if token == space:
                    word = beam.node.word
                    if word is None or last == space:
                        continue
                    node, bonus = (
                        lexicon.root,
                        beam.bonus + word_weight * lexicon.scores.get(word, 0.0),
                    )
                else:
                    child = beam.node.children.get(alphabet[token - 1])
                    if child is None:
                        continue
                    node, bonus = child, beam.bonus
                extended = (*prefix, token)
                target = next_beams.get(extended)
                if target is None:
                    target = _Beam(node=node, bonus=bonus)
                    next_beams[extended] = target
                # A repeated token needs a blank in between; otherwise any path counts.
                source = beam.blank if token == last else total
                target.label = _logaddexp(target.label, source + char_lp)
        ranked = sorted(next_beams.items(), key=lambda kv: kv[1].total + kv[1].bonus, reverse=True)
        beams = dict(ranked[:beam_size])

    best: tuple[float, tuple[int, ...]] | None = None
    for prefix, beam in beams.items():
        assert beam.node is not None
        if beam.node is lexicon.root:
            score = beam.total + beam.bonus
        elif beam.node.word is not None:
            score = beam.total + beam.bonus + word_weight * lexicon.scores.get(beam.node.word, 0.0)
        else:
            continue
        if best is None or score > best[0]:
            best = (score, prefix)
    if best is None:
        return greedy_decode(lp, alphabet)
    return " ".join("".join(alphabet[t - 1] for t in best[1]).split())
