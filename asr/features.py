"""Log-mel features in torch: the model's front end, causal by construction.

Frame ``i`` covers samples ``[i * hop, i * hop + win)`` -- no centring, no padding -- so
it depends on no later audio, and a stream can compute frames as samples arrive. Each
frame is Hann-windowed (periodic), zero-padded to ``n_fft``, and its power spectrum is
pooled by triangular filters on the HTK mel scale; the result is ``log(mel + floor)``.
Audio is float in [-1, 1) (int16 PCM divided by 32768).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = 16_000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    f_min: float = 20.0
    f_max: float = 7_600.0
    log_floor: float = 1e-6

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def frame_count(self, n_samples: int) -> int:
        """Frames in ``n_samples`` samples (a partial frame at the end is dropped)."""
        if n_samples < self.win_length:
            return 0
        return 1 + (n_samples - self.win_length) // self.hop_length

    def last_sample(self, frame: int) -> int:
        """The last sample index that frame ``frame`` depends on."""
        return frame * self.hop_length + self.win_length - 1


def hz_to_mel(hz: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(config: FeatureConfig) -> npt.NDArray[np.float64]:
    """``(n_fft // 2 + 1, n_mels)`` triangular filters, peak 1, on the HTK mel scale."""
    bins = np.linspace(0.0, config.sample_rate / 2, config.n_fft // 2 + 1)
    edges = mel_to_hz(
        np.linspace(hz_to_mel(config.f_min), hz_to_mel(config.f_max), config.n_mels + 2)
    )
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - lower[None, :]) / (center - lower)[None, :]
    falling = (upper[None, :] - bins[:, None]) / (upper - center)[None, :]
    return np.maximum(0.0, np.minimum(rising, falling))


def hann_window(length: int) -> npt.NDArray[np.float64]:
    """The periodic Hann window (as ``torch.hann_window(length)``)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)


class LogMel(nn.Module):
    """``(batch, samples)`` float audio -> ``(batch, frames, n_mels)`` log-mel features.

    The window and the filterbank are derived from the config and are not part of the
    model's state (a diff can never change them).
    """

    window: torch.Tensor
    filterbank: torch.Tensor

    def __init__(self, config: FeatureConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer(
            "window", torch.tensor(hann_window(config.win_length), dtype=torch.float32), False
        )
        self.register_buffer(
            "filterbank", torch.tensor(mel_filterbank(config), dtype=torch.float32), False
        )

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        c = self.config
        if audio.shape[-1] < c.win_length:
            return audio.new_zeros((*audio.shape[:-1], 0, c.n_mels))
        frames = audio.unfold(-1, c.win_length, c.hop_length) * self.window
        spectrum = torch.fft.rfft(frames, n=c.n_fft)
        power = spectrum.real.square() + spectrum.imag.square()
        return torch.log(torch.matmul(power, self.filterbank) + c.log_floor)


def log_mel_numpy(audio: npt.ArrayLike, config: FeatureConfig) -> npt.NDArray[np.float64]:
    """The same features in float64 numpy: the reference the tests hold the module to."""
    x = np.asarray(audio, dtype=np.float64)
    count = config.frame_count(len(x))
    if count == 0:
        return np.zeros((0, config.n_mels))
    starts = np.arange(count) * config.hop_length
    frames = x[starts[:, None] + np.arange(config.win_length)[None, :]]
    spectrum = np.fft.rfft(frames * hann_window(config.win_length), n=config.n_fft)
    power = np.abs(spectrum) ** 2
    result: npt.NDArray[np.float64] = np.log(power @ mel_filterbank(config) + config.log_floor)
    return result
