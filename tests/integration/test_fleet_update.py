"""Devices at versions 0, 1 and 3 (and one with no model) reach version 5 through real
agent processes and the real server, each downloading what its plan chose."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.conftest import Published, provision_device, run_once


def test_devices_converge_to_the_published_digest(published: Published, tmp_path: Path) -> None:
    lineage = published.lineage
    full_bytes = lineage.files[5].stat().st_size
    downloaded = {}
    for start in (0, 1, 3, None):
        device = f"dev-{start}"
        state = tmp_path / device
        provision_device(published, state, device, start)
        result = run_once(published.server.url, state)
        assert result.returncode == 0, result.stdout + result.stderr
        current = json.loads((state / "current.json").read_text())
        assert current["digest"] == lineage.digests[5]
        assert current["version"] == 5
        reports = [json.loads(line) for line in (state / "reports.jsonl").read_text().splitlines()]
        assert reports[-1]["outcome"] == "updated"
        assert reports[-1]["to_digest"] == lineage.digests[5]
        downloaded[start] = (reports[-1]["plan_kind"], reports[-1]["bytes_downloaded"])
        # the server's inventory agrees
        with published.server.client() as client:
            seen = client.get(f"/v1/devices/{device}").json()
        assert (seen["version"], seen["digest"]) == (5, lineage.digests[5])
        # a second cycle finds nothing to do
        again = run_once(published.server.url, state)
        assert again.returncode == 0
        assert "current" in again.stdout
    assert downloaded[None] == ("full", full_bytes)
    for start in (0, 1, 3):
        kind, size = downloaded[start]
        assert kind in ("chain", "composed")
        assert size < full_bytes / 2
    assert sum(size for _, size in downloaded.values()) < 4 * full_bytes
