"""``diffcast asr``: transcribe and eval with a small untrained checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from asr.cli import app
from asr.corpus import CorpusConfig, plan_utterance, synthesize, write_wav
from asr.model import CTCModel, ModelConfig, config_path_for, save_checkpoint

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
runner = CliRunner()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = CTCModel(ModelConfig(dim=32, blocks=2, kernel=5, expansion=2))
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(model, path)
    return path


def test_transcribe(tmp_path: Path, checkpoint: Path) -> None:
    rng = np.random.default_rng(0)
    clip = tmp_path / "clip.wav"
    write_wav(clip, (rng.standard_normal(16_000) * 1000).astype(np.int16))
    result = runner.invoke(app, ["transcribe", str(checkpoint), str(clip), "--decoder", "both"])
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 2  # greedy, then lexicon


def test_transcribe_resamples_other_rates(tmp_path: Path, checkpoint: Path) -> None:
    clip = tmp_path / "clip.wav"
    write_wav(clip, np.zeros(22_050, dtype=np.int16), rate=22_050)
    result = runner.invoke(app, ["transcribe", str(checkpoint), str(clip), "--decoder", "greedy"])
    assert result.exit_code == 0, result.output


def test_missing_config_is_an_error(tmp_path: Path, checkpoint: Path) -> None:
    config_path_for(checkpoint).unlink()
    clip = tmp_path / "clip.wav"
    write_wav(clip, np.zeros(16_000, dtype=np.int16))
    result = runner.invoke(app, ["transcribe", str(checkpoint), str(clip)])
    assert result.exit_code == 2
    assert "error:" in result.output
    assert "Traceback" not in result.output


@needs_espeak
def test_eval_synthesizes_what_it_scores(tmp_path: Path, checkpoint: Path) -> None:
    out = tmp_path / "report.json"
    args = ["eval", str(checkpoint), "--split", "swimmers/test", "--limit", "2"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--json", str(out), "--workers", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (report,) = json.loads(out.read_text())
    assert report["split"] == "swimmers/test"
    assert report["utterances"] == 2
    assert report["lexicon_updates"] == ["swimmers"]
    for decoder in ("greedy", "lexicon"):
        cohorts = report[decoder]["cohorts"]
        assert set(cohorts) == {"all", "en-us", "en-us-nyc"}
        assert cohorts["all"]["words"] > 0
        assert 0.0 <= report[decoder]["new_word_recall"] <= 1.0


@needs_espeak
def test_transcribe_a_corpus_clip(tmp_path: Path, checkpoint: Path) -> None:
    clip = tmp_path / "clip.wav"
    write_wav(clip, synthesize(plan_utterance(CorpusConfig(), "base/test", 0)))
    result = runner.invoke(app, ["transcribe", str(checkpoint), str(clip)])
    assert result.exit_code == 0, result.output


def test_registered_under_diffcast() -> None:
    diffcast = Path(sys.executable).parent / "diffcast"
    if not diffcast.exists():
        pytest.skip("diffcast is not installed")
    done = subprocess.run(
        [str(diffcast), "asr", "updates"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "ledecky" in done.stdout
