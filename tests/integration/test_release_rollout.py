"""Releases end to end with real agents: a version failing its health check on one
cohort halts the release after M attempts and the rest of the fleet stays put; an
explicit rollback release takes a device back to an older version, signed as such."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from device_agent.fleet import simulate
from device_agent.health import MaxAbsHealthCheck
from diffs.container import diff_bytes
from diffs.make import make_exact
from diffs.model import Tensor, load_model
from tests.integration.conftest import Published, provision_device, run_once
from tests.integration.live import ADMIN_TOKEN


def test_cohort_health_failures_halt_the_release(published: Published, tmp_path: Path) -> None:
    lineage = published.lineage
    with published.server.client() as client:
        # version 6 moves one weight far out: the canaries of cohort c0 reject it
        model = load_model(lineage.files[5])
        flat = model["enc.weight"].array.reshape(-1).copy()
        flat[0] = 50.0
        bad = {**model, "enc.weight": Tensor.of(flat.reshape(model["enc.weight"].shape))}
        r = client.post(
            "/v1/models/asr/versions",
            params={"parent": 5},
            content=diff_bytes(make_exact(model, bad)),
        )
        assert r.status_code == 201, r.text
        rid = client.post(
            "/v1/releases",
            json={
                "model": "asr",
                "version": 6,
                "activate": True,
                "min_attempts": 4,
                "failure_threshold": 0.2,
            },
        ).json()["id"]
    result = simulate(
        published.server.url,
        ADMIN_TOKEN,
        "asr",
        tmp_path / "fleet",
        [5] * 12,
        concurrency=1,
        timeout=60,
        health_check=lambda i: MaxAbsHealthCheck(10.0) if i % 4 == 0 else None,
        prefix="halt",
    )
    with published.server.client() as client:
        shown = client.get(f"/v1/releases/{rid}").json()
    assert shown["state"] == "halted"
    attempts = shown["progress"]["applied"] + shown["progress"]["failed"]
    assert attempts == 4
    assert shown["progress"]["failures_by_reason"] == {"health_check_failed": 1}
    on_new = [d for d in result.devices if d.final_version == 6]
    assert len(on_new) == 3  # the three healthy devices that went before the halt
    assert all(d.final_version == 5 for d in result.devices if d not in on_new)


def test_explicit_rollback_release(published: Published, tmp_path: Path) -> None:
    lineage = published.lineage
    state = tmp_path / "dev"
    provision_device(published, state, "rollback-dev", 5)
    with published.server.client() as client:
        for release in client.get("/v1/releases", params={"state": "active"}).json():
            client.post(f"/v1/releases/{release['id']}/halt")
        rid = client.post(
            "/v1/releases",
            json={
                "model": "asr",
                "version": 3,
                "activate": True,
                "rollback": True,
                "selector": {"devices": ["rollback-dev"]},
            },
        ).json()["id"]
    result = run_once(published.server.url, state)
    assert result.returncode == 0, result.stdout + result.stderr
    current = json.loads((state / "current.json").read_text())
    assert (current["version"], current["digest"]) == (3, lineage.digests[3])
    report = json.loads((state / "reports.jsonl").read_text().splitlines()[-1])
    assert report["release_id"] == rid
    assert np.isfinite(report["seconds"])
