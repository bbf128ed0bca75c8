"""The Docker stack end to end: PostgreSQL + SeaweedFS (S3) + two server replicas + a
fleet of simulated devices (docker-compose.yml). ``scripts/docker-test`` (``make
docker-test``) builds and starts the stack, runs this module and tears it all down; it
tells this module how to reach compose in ``DIFFCAST_COMPOSE``.

One test in three stages, each relying on the one before:

1. Publish a base and two diffs (through both replicas), release the last version to
   50% of the fleet; the devices in that half converge through PostgreSQL + S3.
2. Kill replica A (SIGKILL) mid-rollout, expand the release to 100% through replica B:
   the whole fleet converges, including devices whose first server was A. A restarts.
3. ``docker-compose down`` (volumes kept) and ``up``: versions, releases, device reports,
   blobs, credentials and the devices' own state are all still there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.lineage import Lineage, make_lineage

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500)]

COMPOSE = os.environ.get("DIFFCAST_COMPOSE", "")
A = "http://127.0.0.1:8081"
B = "http://127.0.0.1:8082"
TOKEN = os.environ.get("DIFFCAST_BOOTSTRAP_TOKEN", "dct_docker-admin")
DEVICES = int(os.environ.get("FLEET_DEVICES", "16"))
MODEL = os.environ.get("FLEET_MODEL", "asr")
SERVICES = ("postgres", "seaweedfs", "server-a", "server-b", "devices")
FLEET_DIR = "/var/lib/diffcast-fleet"

T = TypeVar("T")


def compose(*args: str, timeout: float = 600) -> str:
    result = subprocess.run(
        [*shlex.split(COMPOSE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"compose {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def in_devices(*command: str) -> str:
    """Run a command in the devices container (where the fleet's state lives)."""
    return compose("exec", "-T", "devices", *command)


def health(service: str) -> str:
    container = compose("ps", "-q", service).strip()
    if not container:
        return "absent"
    result = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.Status}}/{{.State.Health.Status}}", container],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "absent"


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 1.0) -> T:
    """``probe()`` until it returns something other than None/False; fail after timeout."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (httpx.HTTPError, AssertionError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if value is not None and value is not False:
                return value
            last = value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def wait_healthy(services: tuple[str, ...] = SERVICES, timeout: float = 300) -> None:
    def all_healthy() -> bool:
        states = {s: health(s) for s in services}
        assert all(state == "running/healthy" for state in states.values()), states
        return True

    wait_for(f"{', '.join(services)} healthy", all_healthy, timeout, every=2.0)


def client(url: str) -> httpx.Client:
    return httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60.0, trust_env=False
    )


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, f"{response.request.url}: {response.text[:500]}"
    return response.json()


def fleet_status() -> str:
    return in_devices("cat", f"{FLEET_DIR}/status").strip()


def state(url: str) -> dict[str, Any]:
    """What must survive a restart: versions, releases (with progress), devices."""
    with client(url) as c:
        versions = ok(c.get(f"/v1/models/{MODEL}/versions"))
        releases = ok(c.get("/v1/releases", params={"model": MODEL}))
        devices = ok(c.get("/v1/devices", params={"limit": 1000}))
    return {"versions": versions, "releases": releases, "devices": devices}


@pytest.fixture(scope="module")
def stack() -> None:
    if not COMPOSE:
        pytest.skip("needs the Docker stack: run make docker-test")
    wait_healthy()


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    return make_lineage(tmp_path_factory.mktemp("models"), 3, rows=256)


def test_stack_converges_survives_a_replica_and_a_restart(
    stack: None, lineage: Lineage, tmp_path: Path
) -> None:
    release_id, before_kill = rollout_to_half_the_fleet(lineage)
    survive_a_killed_replica(lineage, release_id, before_kill)
    restart_without_losing_data(lineage)


def rollout_to_half_the_fleet(lineage: Lineage) -> tuple[int, set[str]]:
    assert fleet_status() == "waiting", "the devices must wait for a release"
    with client(A) as a, client(B) as b:
        ok(a.post("/v1/models", json={"name": MODEL}), 201)
        ok(a.post(f"/v1/models/{MODEL}/versions", content=lineage.files[0].read_bytes()), 201)
        # each replica publishes one diff: they share the database and the object store
        for number, (replica, diff) in enumerate(zip((b, a), lineage.diffs, strict=True), 1):
            url = f"/v1/models/{MODEL}/versions"
            ok(replica.post(url, params={"parent": number - 1}, content=diff), 201)
        for replica in (a, b):
            listed = ok(replica.get(f"/v1/models/{MODEL}/versions"))
            assert [v["digest"] for v in listed] == lineage.digests
        half = {"model": MODEL, "version": 2, "name": "docker-half", "percent": 50.0}
        release = ok(b.post("/v1/releases", json={**half, "activate": True}), 201)

        readings: list[dict[str, Any]] = []

        def half_settled() -> dict[str, Any] | None:
            """The progress once some devices applied it, none is midway, and nothing
            changed for a few seconds (every device polls every half second)."""
            progress = ok(a.get(f"/v1/releases/{release['id']}"))["progress"]
            settled = progress["applied"] and not progress["pending"]
            readings.append(progress)
            return progress if settled and readings[-2:-1] == [progress] else None

        first = wait_for("the first half of the rollout", half_settled, 300, every=4.0)
        devices = ok(b.get("/v1/devices", params={"limit": 1000}))
    assert len(devices) == DEVICES, [d["id"] for d in devices]
    updated = {d["id"] for d in devices if d["digest"] == lineage.digests[2]}
    assert len(updated) == first["applied"]
    assert 0 < len(updated) < DEVICES, "50% must leave some devices behind"
    assert fleet_status() == "running"
    return int(release["id"]), updated


def survive_a_killed_replica(lineage: Lineage, release_id: int, before_kill: set[str]) -> None:
    compose("kill", "server-a")  # SIGKILL, in the middle of the devices' polls

    def a_refuses() -> bool:
        try:
            httpx.get(f"{A}/readyz", timeout=2, trust_env=False)
        except httpx.ConnectError:
            return True
        return False

    wait_for("replica A to refuse connections", a_refuses, 30, every=0.5)
    with client(B) as b:
        ok(b.post(f"/v1/releases/{release_id}/expand", json={"percent": 100.0}))

        def fleet_done() -> str | None:
            status = fleet_status()
            return status if status in ("converged", "failed") else None

        done = wait_for("the fleet to converge without replica A", fleet_done, 600, every=2.0)
        assert done == "converged", in_devices("tail", "-40", f"{FLEET_DIR}/fleet.log")
        assert health("server-a").startswith("exited"), "replica A came back by itself"
        report = json.loads(in_devices("cat", f"{FLEET_DIR}/report.json"))
        progress = ok(b.get(f"/v1/releases/{release_id}"))["progress"]
        devices = ok(b.get("/v1/devices", params={"limit": 1000}))
    assert report["converged"] == DEVICES
    assert {d["final_digest"] for d in report["devices"]} == {lineage.digests[2]}
    # The simulator gives device i replica i % 2 first: even devices started on A.
    started_on_a = {d["device_id"] for d in report["devices"] if int(d["device_id"][-4:]) % 2 == 0}
    assert started_on_a - before_kill, "no device had to fail over from A to B"
    # what the devices reported is in the database
    assert {d["digest"] for d in devices} == {lineage.digests[2]}
    assert {d["version"] for d in devices} == {2}
    assert progress["applied"] == DEVICES and progress["failed"] == 0, progress

    compose("start", "server-a")
    wait_healthy(("server-a",))
    with client(A) as a:
        assert ok(a.get(f"/v1/releases/{release_id}"))["progress"] == progress


def restart_without_losing_data(lineage: Lineage) -> None:
    before = state(A)
    compose("down")  # containers go, volumes stay
    assert all(health(service) == "absent" for service in SERVICES)
    compose("up", "-d")
    wait_healthy()
    for url in (A, B):
        assert state(url) == before, f"{url} after the restart"
    assert fleet_status() == "converged"
    assert "already ran" in compose("logs", "--no-color", "devices")
    # the objects are still in S3: a snapshot and a diff, byte for byte
    v2, v1 = before["versions"][2], before["versions"][1]
    blobs = [
        (A, v2["snapshot_sha256"], v2["snapshot_size"]),
        (B, v1["diff_sha256"], v1["diff_size"]),
    ]
    for url, sha, size in blobs:
        blob = httpx.get(f"{url}/v1/blobs/{sha}", timeout=60, trust_env=False)
        assert blob.status_code == 200, blob.text[:300]
        assert len(blob.content) == size and hashlib.sha256(blob.content).hexdigest() == sha
    # a device's credential (database) and its state (volume): one cycle, nothing to do
    cycle = in_devices(
        *("diffcast", "agent", "run", "--once", "--model", MODEL, "--server", B),
        *("--state-dir", f"{FLEET_DIR}/devices/sim-0000"),
    )
    assert f"current; running {lineage.digests[2]}" in cycle, cycle
