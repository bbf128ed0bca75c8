"""The log-mel front end against a float64 numpy reference; shapes and causality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asr.features import FeatureConfig, LogMel, log_mel_numpy, mel_filterbank

CONFIG = FeatureConfig()


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * CONFIG.sample_rate)) / CONFIG.sample_rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 2500 * t)
    return (tone + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.mark.parametrize(("samples", "frames"), [(0, 0), (399, 0), (400, 1), (559, 1), (560, 2)])
def test_frame_count(samples: int, frames: int) -> None:
    assert CONFIG.frame_count(samples) == frames
    assert LogMel(CONFIG)(torch.zeros(1, samples)).shape == (1, frames, CONFIG.n_mels)


def test_matches_numpy_reference() -> None:
    audio = _audio(0.5)
    expected = log_mel_numpy(audio, CONFIG)
    actual = LogMel(CONFIG)(torch.from_numpy(audio)[None])[0].numpy()
    assert actual.shape == expected.shape == (CONFIG.frame_count(len(audio)), 80)
    # float32 FFT against float64: log-mel agrees to well under a hundredth of a neper
    # wherever there is energy (the floor dominates nowhere in this signal).
    np.testing.assert_allclose(actual, expected, atol=2e-3, rtol=0)


def test_filterbank_shape_and_peaks() -> None:
    bank = mel_filterbank(CONFIG)
    assert bank.shape == (CONFIG.n_fft // 2 + 1, CONFIG.n_mels)
    assert bank.min() >= 0.0
    assert np.all(bank.max(axis=0) > 0.3)  # every filter sees at least one FFT bin
    assert np.all(np.diff(bank.argmax(axis=0)) >= 0)  # centres rise with the index


def test_tone_lands_in_its_mel_bin() -> None:
    t = np.arange(CONFIG.sample_rate) / CONFIG.sample_rate
    feats = log_mel_numpy(np.sin(2 * np.pi * 1000 * t), CONFIG)
    peak = int(feats.mean(axis=0).argmax())
    assert mel_filterbank(CONFIG)[round(1000 / 8000 * 256), peak] > 0.5


def test_frames_depend_on_no_later_audio() -> None:
    audio = torch.from_numpy(_audio(0.3))
    changed = audio.clone()
    frame = 7
    changed[CONFIG.last_sample(frame) + 1 :] = 0.5
    logmel = LogMel(CONFIG)
    a, b = logmel(audio[None])[0], logmel(changed[None])[0]
    assert torch.equal(a[: frame + 1], b[: frame + 1])
    assert not torch.equal(a[frame + 1], b[frame + 1])
