"""A smoke run of ``bench/server_load.py --quick``: a real server (several workers),
a few hundred requests per measurement on SQLite and PostgreSQL, and the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def test_quick_run_writes_every_figure(tmp_path: Path) -> None:
    if not _pg_available():
        pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (start it: see .ci/run)")
    output = tmp_path / "server_load.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "server_load.py"), "--quick", "--output", output],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "blob download MB/s" in done.stdout  # the table

    report = json.loads(output.read_text())
    assert report["quick"] is True
    machine = report["machine"]
    for key in ("cpu_model", "cpu_count", "python", "uvicorn", "sqlite", "postgresql"):
        assert machine[key], key
    assert set(report["databases"]) == {"sqlite", "postgresql"}
    for kind, result in report["databases"].items():
        assert result["setup"]["devices"] == report["config"]["devices"], kind
        assert result["server"]["workers"] >= 2
        for key in ("poll_closed", "poll_closed_304", "plan_closed", "plan_closed_mixed"):
            assert result[key]["best"] > 0 and result[key]["errors"] == 0, (kind, key)
            # A smoke run on a shared machine: no rate is asserted.
            assert result[key]["runs"][0]["requests"] > 0, (kind, key)
        for key in ("poll_open", "poll_open_new_connection"):
            run = result[key]["runs"][0]
            assert run["errors"] == 0 and run["requests"] == run["offered_requests"], (kind, key)
            assert 0 < result[key]["p50_ms_median"] <= result[key]["p99_ms_median"], (kind, key)
        cold = result["release"]["cold_first_plan"]
        assert cold and all("composed" in plan["options"] for plan in cold), kind
        assert result["blob"]["best"] > 0 and result["blob"]["errors"] == 0, kind
        assert set(result["targets_met"]) == {"poll_rps", "open_p99_ms", "blob_mb_s"}, kind
