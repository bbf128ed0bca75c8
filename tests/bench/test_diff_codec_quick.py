"""``bench/diff_codec.py --quick``: it runs end to end, its JSON has every field, and our
exact diff is smaller than each generic delta tool that is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from diffs.kernels import backend

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "diff_codec.py"
TOOL_BINARIES = {"zstd": ["zstd"], "bsdiff": ["bsdiff", "bspatch"], "xdelta3": ["xdelta3"]}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("diff_codec")
    output = tmp / "diff_codec.json"
    # One row of the quick size (1 M params at 10%): big enough that the ~300 bytes of
    # manifest per tensor do not decide the comparison, small enough for a few seconds.
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--densities",
        "10",
        "--repeats",
        "1",
        "--output",
        str(output),
        "--workdir",
        str(tmp),
    ]
    result = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr
    assert "Exact diff vs generic delta tools" in result.stdout
    loaded: dict[str, Any] = json.loads(output.read_text())
    return loaded


def test_report_has_every_field(report: dict[str, Any]) -> None:
    machine = report["machine"]
    for field in ("platform", "cpu_model", "cpu_count", "python", "numpy", "date"):
        assert machine[field], field
    config = report["config"]
    assert config["quick"] is True
    assert config["params"] == 1_000_000
    assert config["densities_percent"] == [10.0]
    assert config["model_file_bytes"] > 4 * config["params"]
    assert sum(_numel(t["shape"]) for t in config["tensors"]) == config["params"]

    (row,) = report["rows"]
    assert row["density_percent"] == 10.0
    assert row["changed"] == row["ours"]["changed"] > 0.099 * config["params"]
    ours = row["ours"]
    assert ours["kinds"] == ["exact"]
    assert ours["total_bytes"] == (
        ours["position_bytes"] + ours["value_bytes"] + ours["overhead_bytes"]
    )
    # Rice-coded positions land within a few percent of log2(C(n, k)), never below it.
    assert ours["position_bound_bits_per_entry"] <= ours["position_bits_per_entry"]
    assert ours["position_bits_over_bound"] < 0.05
    assert 0 < ours["value_bits_per_entry"] <= 32
    assert 0 < ours["encode_s"]["best"] <= ours["encode_s"]["median"]

    apply = row["apply"]
    assert apply["kernels"] == backend()
    paths = ("direct", "decoded") if backend() == "native" else ("decoded",)
    measured = [apply["warm"], apply["cold"]] + [
        group[f"{path}_{mode}"]
        for group, names in ((apply["paths"], paths), (apply["numpy"], ("decoded",)))
        for path in names
        for mode in ("cold", "warm")
    ]
    measured += [apply["numpy_keep_heap"][f"decoded_{mode}"] for mode in ("cold", "warm")]
    if backend() == "native":  # the kernels' path, measured with its data in the caches too
        assert apply["hot"] == apply["paths"]["direct_hot"]
        measured.append(apply["hot"])
    for result in measured:
        assert result["entries_per_s"] > 0
        assert 0 < result["cpu_s"]["best"] <= result["cpu_s"]["median"]
    decoded = apply["paths"]["decoded_warm"]
    assert decoded["decode_wall_s_of_best"] + decoded["scatter_wall_s_of_best"] == pytest.approx(
        decoded["s"]["best"]
    )
    assert apply["apply_to_file"]["s"]["best"] > 0
    assert apply["apply_to_file"]["entries_per_s"] > 0
    rss = apply["rss"]
    assert rss["peak_kib"] >= rss["baseline_kib"] > 0
    assert rss["model_file_bytes"] == config["model_file_bytes"]

    summary = report["summary"]
    assert summary["target_entries_per_s"] == 50e6
    for field in (
        "ours_smaller_than_every_tool_on_every_row",
        "min_warm_entries_per_s",
        "min_cold_entries_per_s",
        "min_hot_entries_per_s",
        "min_numpy_warm_entries_per_s",
        "warm_meets_target",
        "max_peak_rss_over_baseline_kib",
    ):
        assert field in summary, field


@pytest.mark.parametrize("tool", sorted(TOOL_BINARIES))
def test_exact_diff_is_smaller_than(report: dict[str, Any], tool: str) -> None:
    missing = [b for b in TOOL_BINARIES[tool] if shutil.which(b) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make system-deps): nothing to compare")
    info = report["tools"][tool]
    assert info["available"], info
    (row,) = report["rows"]
    theirs = row["generic"][tool]
    assert theirs["roundtrip_ok"], f"{tool} did not reproduce the new model"
    assert row["ours"]["total_bytes"] < theirs["bytes"], (row["ours"]["total_bytes"], theirs)
    assert row["ours_smaller_than"][tool] is True


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
