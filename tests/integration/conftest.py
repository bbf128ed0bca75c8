"""Fixtures for tests that run the real server and real agent processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.live import LiveServer, live_server
from tests.lineage import Lineage, make_lineage

AGENT = [sys.executable, "-c", "from diffs.cli import main; main()"]


@pytest.fixture(scope="module")
def lineage6(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    return make_lineage(tmp_path_factory.mktemp("lineage6"), 6, rows=256)


@dataclass
class Published:
    server: LiveServer
    lineage: Lineage
    bundle: Path


def publish(server: LiveServer, lineage: Lineage, model: str = "asr") -> Path:
    with server.client() as client:
        assert client.post("/v1/models", json={"name": model}).status_code == 201
        r = client.post(f"/v1/models/{model}/versions", content=lineage.files[0].read_bytes())
        assert r.status_code == 201, r.text
        for number, diff in enumerate(lineage.diffs, 1):
            r = client.post(
                f"/v1/models/{model}/versions", params={"parent": number - 1}, content=diff
            )
            assert r.status_code == 201, r.text
        bundle = client.get("/v1/provisioning")
        assert bundle.status_code == 200, bundle.text
    path = server.data_dir / "bundle.json"
    path.write_text(json.dumps(bundle.json()))
    return path


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, lineage6: Lineage) -> Iterator[Published]:
    with live_server(tmp_path_factory.mktemp("server")) as server:
        yield Published(server, lineage6, publish(server, lineage6))


def run_agent(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def run_once(server_url: str, state: Path, model: str = "asr") -> subprocess.CompletedProcess[str]:
    """One cycle of a real `diffcast agent run --once` process for the device at ``state``."""
    return run_agent(
        [
            "agent",
            "run",
            "--once",
            "--server",
            server_url,
            "--state-dir",
            str(state),
            "--model",
            model,
        ]
    )


def provision_device(
    published: Published, state: Path, device_id: str, version: int | None
) -> None:
    args = ["agent", "provision", "--state-dir", str(state), "--bundle", str(published.bundle)]
    args += ["--device-id", device_id]
    if version is not None:
        args += ["--initial-model", str(published.lineage.files[version]), "--model", "asr"]
        args += ["--version", str(version)]
    result = run_agent(args)
    assert result.returncode == 0, result.stderr
