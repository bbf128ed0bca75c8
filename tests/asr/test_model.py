"""The CTC model: shapes, streaming (causality), batching, checkpoint round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asr import CheckpointError
from asr.model import (
    CTCModel,
    ModelConfig,
    config_path_for,
    load_checkpoint,
    log_probs,
    model_state_digest,
    read_config,
    save_checkpoint,
)
from diffs.digest import file_digest

SMALL = ModelConfig(dim=32, blocks=3, kernel=5, expansion=2, lookahead=2)


def _model(config: ModelConfig = SMALL, seed: int = 0) -> CTCModel:
    torch.manual_seed(seed)
    model = CTCModel(config).eval()
    model.set_normalization(torch.full((80,), -5.0), torch.full((80,), 3.0))
    return model


def _audio(samples: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(-0.3, 0.3, samples)).float()


def test_default_size_is_in_range() -> None:
    count = CTCModel(ModelConfig()).parameter_count()
    assert 500_000 <= count <= 5_000_000


@pytest.mark.parametrize("samples", [400, 1_000, 16_000, 23_456])
def test_forward_shapes(samples: int) -> None:
    model = _model()
    logits, lengths = model(_audio(samples)[None], torch.tensor([samples]))
    frames = SMALL.output_frames(samples)
    assert logits.shape == (1, frames, SMALL.vocab_size)
    assert lengths.tolist() == [frames]


def test_batch_gives_each_clip_what_it_gets_alone() -> None:
    model = _model()
    clips = [_audio(16_000, 1), _audio(9_000, 2), _audio(12_345, 3)]
    batched = log_probs(model, clips, batch_seconds=10.0)
    for clip, lp in zip(clips, batched, strict=True):
        alone = log_probs(model, [clip])[0]
        assert lp.shape == alone.shape
        np.testing.assert_allclose(lp, alone, atol=1e-5)


def test_output_depends_on_no_audio_beyond_the_lookahead() -> None:
    model = _model()
    audio = _audio(32_000)
    frame = 20
    cut = SMALL.last_sample(frame) + 1
    assert cut < 32_000
    changed = audio.clone()
    changed[cut:] = _audio(32_000 - cut, seed=9)
    lengths = torch.tensor([32_000])
    with torch.no_grad():
        a, _ = model(audio[None], lengths)
        b, _ = model(changed[None], lengths)
    assert torch.equal(a[0, : frame + 1], b[0, : frame + 1])
    assert not torch.equal(a[0, frame + 1], b[0, frame + 1])
    # ... and it does look ahead: changing the sample just before the cut moves frame t.
    changed = audio.clone()
    changed[cut - 1 :] = 0.0
    with torch.no_grad():
        c, _ = model(changed[None], lengths)
    assert not torch.equal(a[0, frame], c[0, frame])


def test_lookahead_is_40ms_per_frame() -> None:
    causal = ModelConfig(lookahead=0)
    assert causal.last_sample(0) == 3 * 160 + 400 - 1  # four 10 ms frames, one window
    assert ModelConfig(lookahead=3).last_sample(0) - causal.last_sample(0) == 3 * 640


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "m.safetensors"
    digest = save_checkpoint(model, path, extra={"note": "test"})
    assert digest == model_state_digest(model) == file_digest(path)
    assert digest.startswith("sha256:")
    description = json.loads(config_path_for(path).read_text())
    assert description["training"] == {"note": "test"}
    assert read_config(path) == SMALL
    loaded = load_checkpoint(path)
    assert model_state_digest(loaded) == digest
    clip = _audio(8_000)
    np.testing.assert_array_equal(log_probs(model, [clip])[0], log_probs(loaded, [clip])[0])
    # Saving again gives the same bytes.
    again = tmp_path / "again.safetensors"
    save_checkpoint(loaded, again)
    assert again.read_bytes() == path.read_bytes()


def test_digest_is_stable() -> None:
    assert model_state_digest(_model(seed=3)) == model_state_digest(_model(seed=3))
    assert model_state_digest(_model(seed=3)) != model_state_digest(_model(seed=4))


def test_state_holds_weights_and_normalization_only() -> None:
    names = set(_model().state_dict())
    assert {"feature_mean", "feature_std", "output.weight"} <= names
    assert not any(n.startswith("logmel.") for n in names)


def test_bad_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(_model(), path)
    config_path_for(path).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a"):
        load_checkpoint(path)
    config_path_for(path).unlink()
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)
    # A config that does not match the weights.
    save_checkpoint(_model(), path)
    other = CTCModel(ModelConfig(dim=48, blocks=3, kernel=5, expansion=2))
    data = json.loads(config_path_for(path).read_text())
    data["model"] = other.config.to_json()
    config_path_for(path).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path)
