"""Canary bundles for the reference model: built from the corpus, a model scored on them,
and a decoder config that does not fit the weights refused before anything is built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from asr import CheckpointError
from asr.canary import DECODER_KIND, build_canary, decoder_config, load_for_canary, score
from asr.cli import app
from asr.model import CTCModel, ModelConfig, save_checkpoint
from diffs.canary import CanaryClip, read_canary, write_canary

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
runner = CliRunner()
TINY = ModelConfig(dim=16, blocks=1, kernel=3, expansion=2, lookahead=1)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(CTCModel(TINY), path)
    return path


def clips() -> list[CanaryClip]:
    rng = np.random.default_rng(1)
    return [
        CanaryClip(
            "noise",
            "turn on the kitchen lights",
            (rng.standard_normal(16_000) * 500).astype(np.int16),
        ),
        CanaryClip("silence", "call mom now", np.zeros(8_000, np.int16)),
    ]


def test_an_untrained_model_misses_every_word(tmp_path: Path, tiny: Path) -> None:
    bundle = build_canary(tmp_path / "c.safetensors", clips(), 0.5, TINY)
    assert bundle.decoder is not None and bundle.decoder["kind"] == DECODER_KIND
    assert decoder_config(bundle) == TINY
    result = score(tiny, read_canary(tmp_path / "c.safetensors"))
    assert (result.clips, result.words) == (2, 8)
    # it says no word of the transcripts (and no more words than they hold): WER is 1.0
    assert result.wer == 1.0 and result.word_errors == 8
    assert len(result.hypotheses) == 2


def test_a_model_that_does_not_fit_the_config_is_refused(tmp_path: Path, tiny: Path) -> None:
    other = ModelConfig(dim=24, blocks=1, kernel=3, expansion=2, lookahead=1)
    bundle = build_canary(tmp_path / "c.safetensors", clips(), 0.5, other)
    with pytest.raises(CheckpointError, match="does not fit"):
        score(tiny, bundle)


@pytest.mark.parametrize(
    "decoder",
    [
        None,
        {"kind": "something-else", "model": {}},
        {"kind": DECODER_KIND},
        {"kind": DECODER_KIND, "model": {"dim": 16, "no_such_field": 1}},
        {"kind": DECODER_KIND, "model": {"features": {"n_fft": 1 << 30}}},
        {"kind": DECODER_KIND, "model": {"features": {"n_mels": 1 << 20}}},
        {"kind": DECODER_KIND, "model": {"features": {"sample_rate": 8000}}},
        {"kind": DECODER_KIND, "model": {"dim": "wide"}},
        {"kind": DECODER_KIND, "model": {"dim": 1 << 40}},
        {"kind": DECODER_KIND, "model": {"blocks": 1 << 20}},
        {"kind": DECODER_KIND, "model": {"stride": 0}},
    ],
)
def test_unusable_decoders_are_checkpoint_errors(
    tmp_path: Path, tiny: Path, decoder: dict[str, object] | None
) -> None:
    bundle = write_canary(tmp_path / "c.safetensors", clips(), 0.5, decoder)
    with pytest.raises(CheckpointError):
        score(tiny, bundle)


def test_weights_that_are_not_a_model(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_for_canary(garbage, TINY)


@needs_espeak
def test_canary_command_builds_a_bundle_from_the_corpus(tmp_path: Path, tiny: Path) -> None:
    out = tmp_path / "canary.safetensors"
    args = ["canary", "--split", "swimmers/test", "--count", "2", "--max-wer", "0.3"]
    args += ["-o", str(out), "--checkpoint", str(tiny), "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(app, [*args, "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "2 clips of swimmers/test" in result.output
    bundle = read_canary(out)
    assert bundle.max_wer == 0.3 and len(bundle.clips) == 2
    assert all(c.transcript and len(c.audio) > 16_000 for c in bundle.clips)
    assert decoder_config(bundle) == TINY
    assert score(tiny, bundle).wer >= 0.0


def test_canary_command_errors(tmp_path: Path, tiny: Path) -> None:
    out = tmp_path / "canary.safetensors"
    bad_split = runner.invoke(
        app, ["canary", "--split", "nope/test", "--max-wer", "1", "-o", str(out)]
    )
    assert bad_split.exit_code == 2 and "unknown split" in bad_split.output
    (tmp_path / "tiny.json").write_text(json.dumps({"format": "other"}))
    bad_config = runner.invoke(
        app, ["canary", "--max-wer", "1", "-o", str(out), "--checkpoint", str(tiny)]
    )
    assert bad_config.exit_code == 2 and "config" in bad_config.output
    assert not out.exists()
