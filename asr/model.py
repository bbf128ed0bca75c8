"""The reference ASR model: a small streaming-friendly convolutional CTC model.

Architecture (all sizes in :class:`ModelConfig`)::

    16 kHz audio -> log-mel (25 ms / 10 ms, 80 bins) -> fixed per-bin normalization
      -> causal strided Conv1d (x4 subsampling: one output every 40 ms)
      -> N residual blocks: LayerNorm -> depthwise Conv1d (causal, or one frame of
         look-ahead in the first ``lookahead`` blocks) -> Linear -> GELU -> Linear
      -> LayerNorm -> Linear to blank + characters

Streaming property: output frame ``t`` depends on no audio after sample
:meth:`ModelConfig.last_sample` ``(t)``, i.e. the model looks ahead ``lookahead``
frames (40 ms each) plus the current feature window; no part of it normalizes over the
utterance. Padded positions of a batch are masked to zero before every convolution, so
a batch gives every utterance the same output it gets alone.

Checkpoints are a plain safetensors file (through :mod:`diffs.torch_bridge` and
:mod:`diffs.model`, so :func:`diffs.digest.model_digest` names it) plus a small JSON file
beside it (``base.safetensors`` -> ``base.json``) holding the :class:`ModelConfig`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from asr import CheckpointError
from asr.features import FeatureConfig, LogMel
from diffs.digest import model_digest
from diffs.errors import DiffError
from diffs.fileio import atomic_output
from diffs.model import load_model, save_model
from diffs.torch_bridge import from_state_dict, to_state_dict

CHECKPOINT_FORMAT = "diffcast-asr-ctc-v1"
ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"
"""Token ``i + 1`` is ``ALPHABET[i]``; token 0 is the CTC blank."""


@dataclass(frozen=True)
class ModelConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    alphabet: str = ALPHABET
    stride: int = 4
    """Feature frames per output frame (10 ms each)."""
    front_kernel: int = 8
    dim: int = 192
    blocks: int = 6
    kernel: int = 9
    expansion: int = 3
    lookahead: int = 3
    """Output frames of look-ahead: the first ``lookahead`` blocks see one frame ahead."""
    dropout: float = 0.0
    """Dropout on each block's MLP and residual branch (costly on CPU; SpecAugment and
    voice variety regularize enough)."""

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 1

    def last_sample(self, frame: int) -> int:
        """The last audio sample that output frame ``frame`` depends on."""
        feature_frame = self.stride * (frame + 1 + min(self.lookahead, self.blocks)) - 1
        return self.features.last_sample(feature_frame)

    def output_frames(self, n_samples: int) -> int:
        return self.features.frame_count(n_samples) // self.stride

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelConfig:
        try:
            features = FeatureConfig(**data.get("features", {}))
            fields = {k: v for k, v in data.items() if k != "features"}
            return replace(cls(**fields), features=features)
        except TypeError as exc:
            raise CheckpointError(f"bad model config: {exc}") from exc


class ConvBlock(nn.Module):
    """Pre-norm residual block: depthwise temporal conv, then a position-wise MLP."""

    def __init__(self, config: ModelConfig, right: int) -> None:
        super().__init__()
        self.left, self.right = config.kernel - 1 - right, right
        dim = config.dim
        self.norm = nn.LayerNorm(dim)
        self.depthwise = nn.Conv1d(dim, dim, config.kernel, groups=dim)
        self.up = nn.Linear(dim, dim * config.expansion)
        self.down = nn.Linear(dim * config.expansion, dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = (self.norm(x) * mask).transpose(1, 2)
        h = self.depthwise(F.pad(h, (self.left, self.right))).transpose(1, 2)
        h = self.down(self.dropout(F.gelu(self.up(h))))
        out: torch.Tensor = (x + self.dropout(h)) * mask
        return out


class CTCModel(nn.Module):
    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        n_mels = config.features.n_mels
        self.logmel = LogMel(config.features)
        self.register_buffer("feature_mean", torch.zeros(n_mels))
        self.register_buffer("feature_std", torch.ones(n_mels))
        self.front = nn.Conv1d(n_mels, config.dim, config.front_kernel, stride=config.stride)
        self.blocks = nn.ModuleList(
            ConvBlock(config, 1 if i < config.lookahead else 0) for i in range(config.blocks)
        )
        self.final_norm = nn.LayerNorm(config.dim)
        self.output = nn.Linear(config.dim, config.vocab_size)

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        with torch.no_grad():
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(std.clamp_min(1e-3))

    def featurize(
        self, audio: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, samples)`` audio -> normalized ``(B, frames, n_mels)`` and frame counts."""
        feats = (self.logmel(audio) - self.feature_mean) / self.feature_std
        c = self.config.features
        frames = torch.where(
            lengths >= c.win_length,
            torch.div(lengths - c.win_length, c.hop_length, rounding_mode="floor") + 1,
            torch.zeros_like(lengths),
        )
        return feats, frames

    def encode(
        self, feats: torch.Tensor, frames: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized features -> ``(B, T, vocab)`` logits and output frame counts."""
        c = self.config
        out_lengths = torch.div(frames, c.stride, rounding_mode="floor")
        if feats.shape[1] < c.stride:
            return feats.new_zeros((feats.shape[0], 0, c.vocab_size)), out_lengths
        pad = c.front_kernel - c.stride
        x = self.front(F.pad(feats.transpose(1, 2), (pad, 0))).transpose(1, 2)
        positions = torch.arange(x.shape[1], device=x.device)
        mask = (positions[None, :] < out_lengths[:, None]).unsqueeze(-1).to(x.dtype)
        x = x * mask
        for block in self.blocks:
            x = block(x, mask)
        return self.output(self.final_norm(x)), out_lengths

    def forward(
        self, audio: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, samples)`` float audio and sample counts -> logits and output lengths."""
        return self.encode(*self.featurize(audio, lengths))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def config_path_for(checkpoint: str | os.PathLike[str]) -> Path:
    """``model.safetensors`` -> ``model.json``."""
    return Path(checkpoint).with_suffix(".json")


def model_state_digest(model: CTCModel) -> str:
    """The canonical digest (:mod:`diffs.digest`) of the model's weights."""
    return model_digest(from_state_dict(model.state_dict()))


def save_checkpoint(
    model: CTCModel,
    path: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
) -> str:
    """Write ``path`` (safetensors) and its JSON config; returns the canonical digest.

    ``extra`` (e.g. training provenance) is stored in the JSON under ``"training"``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    weights = from_state_dict(model.state_dict())
    save_model(target, weights)
    description: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": model.config.to_json(),
        "parameters": model.parameter_count(),
    }
    if extra:
        description["training"] = extra
    with atomic_output(config_path_for(target)) as out:
        out.write(json.dumps(description, indent=2, sort_keys=True).encode() + b"\n")
    return model_digest(weights)


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The :class:`ModelConfig` in a checkpoint's JSON (give either file)."""
    json_path = config_path_for(path)
    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read model config {json_path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{json_path} is not a {CHECKPOINT_FORMAT} config")
    return ModelConfig.from_json(data["model"])


def load_checkpoint(path: str | os.PathLike[str]) -> CTCModel:
    """The model in ``path`` (safetensors, with its JSON config beside it), in eval mode."""
    return load_weights(path, read_config(path))


def load_weights(path: str | os.PathLike[str], config: ModelConfig) -> CTCModel:
    """The model of ``config`` with the weights in ``path`` (safetensors), in eval mode."""
    model = CTCModel(config)
    try:
        state = to_state_dict(load_model(path))
    except (DiffError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit its config: {exc}") from exc
    return model.eval()


def to_float_audio(clip: Any) -> torch.Tensor:
    """int16 PCM (or float in [-1, 1)) as a float32 tensor in [-1, 1)."""
    array = np.asarray(clip)
    if array.dtype == np.int16:
        return torch.from_numpy(array.astype(np.float32) / 32768.0)
    return torch.from_numpy(array.astype(np.float32))


def pad_batch(clips: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips -> zero-padded ``(B, samples)`` float audio and sample counts."""
    tensors = [to_float_audio(c) for c in clips]
    lengths = torch.tensor([len(t) for t in tensors], dtype=torch.int64)
    batch = torch.zeros(len(tensors), int(lengths.max()) if tensors else 0)
    for row, tensor in enumerate(tensors):
        batch[row, : len(tensor)] = tensor
    return batch, lengths


@torch.no_grad()
def log_probs(
    model: CTCModel, clips: Sequence[Any], batch_seconds: float = 120.0
) -> list[npt.NDArray[np.float32]]:
    """Per clip, the ``(frames, vocab)`` log-probabilities (batched by similar length)."""
    was_training = model.training
    model.eval()
    rate = model.config.features.sample_rate
    order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
    results: list[npt.NDArray[np.float32]] = [np.zeros((0, 0), np.float32)] * len(clips)
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and len(clips[order[stop]]) * (stop - start + 1) <= (
            batch_seconds * rate
        ):
            stop += 1
        chunk = order[start:stop]
        audio, lengths = pad_batch([clips[i] for i in chunk])
        logits, out_lengths = model(audio, lengths)
        lp = torch.log_softmax(logits, dim=-1)
        for row, index in enumerate(chunk):
            results[index] = lp[row, : int(out_lengths[row])].numpy()
        start = stop
    model.train(was_training)
    return results
