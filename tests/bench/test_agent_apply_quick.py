"""``bench/agent_apply.py --quick``: it runs end to end and its JSON has every field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "agent_apply.py"


def test_quick_run_writes_the_report(tmp_path: Path) -> None:
    output = tmp_path / "agent_apply.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--sizes",
        "60000",
        "600000",
        "--steps",
        "3",
        "--output",
        str(output),
        "--workdir",
        str(tmp_path / "work"),
    ]
    result = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "Device apply" in result.stdout
    report = json.loads(output.read_text())

    machine = report["machine"]
    for field in ("cpu_model", "cpu_count", "python", "numpy", "date", "workdir_filesystem"):
        assert machine[field], field
    config = report["config"]
    assert config["quick"] is True
    assert config["measured_steps"] == [1, 3]
    assert [m["params"] for m in report["models"]] == [60000, 600000]

    rows = report["rows"]
    # 2 sizes x 2 kinds x 2 densities x (1 step, 3 steps)
    assert len(rows) == 16
    seen = {(r["params"], r["kind"], r["density_percent"], r["steps"]) for r in rows}
    assert len(seen) == 16
    for row in rows:
        assert row["changed_entries"] > 0
        assert 0 < row["largest_entry"] <= row["changed_entries"]
        assert row["diff_bytes"] > 0
        assert row["model_file_bytes"] > 4 * row["params"]  # float32 + the header
        assert row["apply_s"]["best"] > 0
        assert row["apply_s"]["best"] <= row["apply_s"]["median"]
        assert row["entries_per_s"] > 0
        assert {"copy", "digest", "flush"} <= set(row["phases_s_of_best"])
        mem = row["memory_kib"]
        for field in (
            "peak_total",
            "ru_maxrss",
            "baseline_anon",
            "peak_anon_sampled",
            "peak_file_sampled",
            "heap_peak",
        ):
            assert mem[field] > 0, field
        assert mem["peak_anon_sampled"] >= mem["baseline_anon"] * 0.9
        assert mem["peak_total"] >= mem["peak_anon_sampled"] * 0.9
        # The heap holds what a few entries need, never a copy of the model.
        assert mem["heap_peak"] * 1024 < row["model_file_bytes"] + (1 << 20)

    summary = report["summary"]
    assert summary["same_diff_larger_model"]
    assert summary["largest_model"]["params"] == 600000
    assert summary["by_config"]
