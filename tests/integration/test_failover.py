"""Replicas: an agent that cannot reach its server moves on to the next replica it knows."""

from __future__ import annotations

from pathlib import Path

from device_agent.fleet import simulate
from tests.integration.conftest import Published, provision_device, run_agent
from tests.integration.live import ADMIN_TOKEN, free_port


def test_agent_falls_back_to_the_next_replica(published: Published, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    state = tmp_path / "device"
    provision_device(published, state, "failover-1", 0)
    args = ["agent", "run", "--once", "--server", dead, "--fallback-server", published.server.url]
    result = run_agent([*args, "--state-dir", str(state), "--model", "asr"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert published.lineage.digests[5] in result.stdout


def test_fleet_spread_over_replicas_survives_a_dead_one(
    published: Published, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = simulate(
        published.server.url,
        ADMIN_TOKEN,
        "asr",
        tmp_path / "fleet",
        [0, 3, 0, 3],
        prefix="failover-fleet",
        concurrency=2,
        timeout=120,
        poll_interval=0.1,
        fallback_servers=[dead],
    )
    assert result.converged == 4, [d.failures for d in result.devices]
    assert {d.final_digest for d in result.devices} == {published.lineage.digests[5]}
