"""`diffcast fleet simulate`: many devices, each with its own credential and state,
starting at different versions, all converge; its report says what each downloaded."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.conftest import Published, run_agent
from tests.integration.live import ADMIN_TOKEN


def test_fleet_of_24_converges(published: Published, tmp_path: Path) -> None:
    report = tmp_path / "fleet.json"
    result = run_agent(
        [
            "fleet",
            "simulate",
            "--server",
            published.server.url,
            "--token",
            ADMIN_TOKEN,
            "--model",
            "asr",
            "--devices",
            "24",
            "--start-versions",
            "0,1,3,5,none",
            "--work-dir",
            str(tmp_path / "fleet"),
            "--concurrency",
            "6",
            "--timeout",
            "240",
            "--report",
            str(report),
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(report.read_text())
    assert summary["converged"] == 24
    assert {d["final_digest"] for d in summary["devices"]} == {published.lineage.digests[5]}
    ids = {d["device_id"] for d in summary["devices"]}
    assert len(ids) == 24
    by_start = {d["start_version"]: d for d in summary["devices"]}
    assert by_start[5]["bytes_downloaded"] == 0
    assert by_start[None]["plan_kinds"] == ["full"]
    assert summary["bytes_downloaded"] < summary["bytes_full"]
    assert "24/24 devices at version 5" in result.stdout
