"""``bench/update_quality.py --quick``: every configuration runs its updates; JSON and PNG."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asr.model import CTCModel, ModelConfig, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "update_quality.py"


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_quick_run_writes_the_report(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    save_checkpoint(CTCModel(ModelConfig(dim=24, blocks=2, kernel=3, expansion=2)), base)
    output = tmp_path / "quality.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--base", str(base), "--output", str(output)]
    cmd += ["--sizes", "25", "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "after update 2" in result.stdout
    report = json.loads(output.read_text())
    assert report["machine"]["cpu_model"]
    assert [r["label"] for r in report["runs"]] == [
        "full fine-tune",
        "sparse 25%",
        "hashed 25%",
        "topk 25%",
    ]
    for run in report["runs"]:
        updates = run["updates"]
        assert [u["update"] for u in updates] == report["course"]["updates"]
        # Each update starts where the previous diff left the model.
        assert all(b["base"] == a["target"] for a, b in itertools.pairwise(updates))
        for u in updates:
            assert u["new_word_wer"] >= 0 and u["old_wer"] >= 0
            if run["method"] != "full":
                assert u["diff_bytes"] <= u["budget_bytes"]
    assert output.with_suffix(".png").stat().st_size > 10_000
