"""The training loop: deterministic batches, augmentation and weights; the LR schedule."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from asr.corpus import CorpusConfig, Utterance, plan_utterance
from asr.model import CTCModel, ModelConfig, model_state_digest
from asr.train import (
    TrainConfig,
    TrainData,
    Trainer,
    encode_texts,
    lr_at,
    plan_epoch,
    set_determinism,
    spec_augment,
)


@pytest.fixture(autouse=True)
def _restore_torch_globals() -> Iterator[None]:
    """Training sets process-wide torch state; give the rest of the suite its own back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


TINY = ModelConfig(dim=24, blocks=2, kernel=3, expansion=2, lookahead=1)
FAST = TrainConfig(
    steps=4, batch_seconds=3.0, warmup_steps=2, eval_every=4, eval_utterances=2, log_every=2
)


def _utterances(count: int, seed: int = 0) -> list[Utterance]:
    """Noise clips with real transcripts (enough to exercise the loop, not to learn)."""
    rng = np.random.default_rng(seed)
    config = CorpusConfig()
    return [
        Utterance(
            plan_utterance(config, "base/train", i),
            (rng.standard_normal(int(rng.integers(8_000, 16_000))) * 3000).astype(np.int16),
        )
        for i in range(count)
    ]


def test_plan_epoch_covers_everything_once() -> None:
    lengths = [int(x) for x in np.random.default_rng(1).integers(100, 1000, 300)]
    batches = plan_epoch(lengths, 2_000, torch.Generator().manual_seed(5), pool=64)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(300))
    assert all(max(lengths[i] for i in b) * len(b) <= 2_000 for b in batches if len(b) > 1)
    again = plan_epoch(lengths, 2_000, torch.Generator().manual_seed(5), pool=64)
    assert again == batches
    assert plan_epoch(lengths, 2_000, torch.Generator().manual_seed(6), pool=64) != batches


def test_replay_mixes_old_data() -> None:
    new, old = _utterances(6, 1), _utterances(30, 2)
    config = replace(FAST, replay_fraction=0.5)
    epoch = TrainData(new, old).epoch(1, 0, config)
    members = [u for b in epoch for u in b]
    assert len(members) == 12
    assert sum(any(u is o for o in old) for u in members) == 6


def test_lr_schedule() -> None:
    config = TrainConfig(steps=1_000, warmup_steps=100, peak_lr=1e-3, final_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(1e-5)
    assert lr_at(99, config) == pytest.approx(1e-3)
    assert lr_at(550, config) == pytest.approx(0.55e-3)
    assert lr_at(1_000, config) == pytest.approx(1e-4)
    assert all(lr_at(s, config) >= lr_at(s + 1, config) for s in range(100, 1_000))


def test_spec_augment_is_seeded_and_masks() -> None:
    feats = torch.randn(3, 200, 80)
    frames = torch.tensor([200, 150, 90])
    a = spec_augment(feats, frames, TrainConfig(), torch.Generator().manual_seed(3))
    b = spec_augment(feats, frames, TrainConfig(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.shape == feats.shape
    assert (a == 0).any()
    off = TrainConfig(mel_warp=0.0, freq_masks=0, time_masks=0)
    assert torch.equal(spec_augment(feats, frames, off, torch.Generator()), feats)


def test_encode_texts() -> None:
    ids, lengths = encode_texts(["ab", "c a"], " ab'c")
    assert ids.tolist() == [2, 3, 5, 1, 2]
    assert lengths.tolist() == [2, 3]


def _trainer(steps: int) -> Trainer:
    set_determinism(7, 1)
    model = CTCModel(TINY)
    config = replace(FAST, steps=steps)
    return Trainer(model, TrainData(_utterances(10)), _utterances(2, 9), config, lambda _: None)


def _train(trainer: Trainer, until: int = 4) -> list[float]:
    stream = trainer.batches()
    return [trainer.train_step(next(stream)) for _ in range(trainer.step, until)]


def test_training_is_deterministic_and_resumable(tmp_path: Path) -> None:
    first = _trainer(4)
    losses = _train(first)
    second = _trainer(4)
    assert _train(second) == losses
    assert all(np.isfinite(losses))
    digest = model_state_digest(first.model)
    assert model_state_digest(second.model) == digest
    # Stop after two steps, save, load into a fresh trainer, finish.
    halfway = _trainer(4)
    _train(halfway, until=2)
    halfway.save_state(tmp_path / "state.pt")
    resumed = _trainer(4)
    resumed.load_state(tmp_path / "state.pt")
    assert resumed.step == 2
    assert _train(resumed) == losses[2:]
    assert model_state_digest(resumed.model) == digest


def test_run_keeps_the_best_dev_weights() -> None:
    set_determinism(3, 1)
    model = CTCModel(TINY)
    trainer = Trainer(model, TrainData(_utterances(8)), _utterances(2, 9), FAST, lambda _: None)
    result = trainer.run()
    assert result.steps == 4
    assert result.best_step == 4
    assert result.best_dev_cer >= 0.0
    assert any("loss" in h for h in result.history)
