"""Attacks on the update path, each refused by a real agent process.

A tampering proxy sits between the agent and the real server and corrupts blobs,
rewrites plans, replays old metadata, serves expired metadata or sends more bytes than
signed; the server itself is made to offer a downgrade. In every case the agent refuses,
the running model (``current.json`` and its file) is untouched byte for byte, and the
failure is delivered with its reason code -- in the device's report history and in what
the server stored.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from tuf.api.metadata import Metadata, Timestamp
from tuf.api.serialization.json import JSONSerializer

from server.context import blob_url, snapshot_path
from server.trust.keys import load_online_keys
from tests.integration.chaos_proxy import (
    ENDLESS_CAP,
    ChaosProxy,
    Device,
    Stage,
    Tamper,
    append_to_blobs,
    endless_blobs,
    flip_blobs,
    rewrite_plans,
    serve,
    stage_fixture,  # noqa: F401  (the fixture)
)
from tests.lineage import Lineage, make_lineage

START = 2
"""The version attacked devices run."""


@pytest.fixture(scope="module")
def atk(stage: Stage, tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    """Model ``atk``: versions 0..5 published; devices run version 2."""
    lineage = make_lineage(tmp_path_factory.mktemp("lineage-atk"), 6, rows=256, seed=5)
    stage.publish("atk", lineage, range(6))
    return lineage


def _attacked(
    stage: Stage, device: Device, tamper: Tamper | None, expected: str
) -> tuple[dict[str, Any], ChaosProxy]:
    """Run one cycle through a proxy doing ``tamper``; check the refusal; return its report."""
    before = device.live_model()
    models = sorted(p.name for p in (device.state / "models").iterdir())
    running = device.current()
    assert running is not None
    with ChaosProxy(stage.server.url, tamper=tamper) as proxy:
        result = device.run_once(proxy.url)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"failed ({expected})" in result.stdout, output
    # the running model is untouched, nothing else went live or stayed behind
    assert device.live_model() == before
    device.assert_valid()
    assert sorted(p.name for p in (device.state / "models").iterdir()) == models
    assert list((device.state / "staging").iterdir()) == []
    # the failure was reported with its reason, and the server has it
    report = device.reports()[-1]
    assert (report["outcome"], report["reason"]) == ("failed", expected), report
    assert report["message"]
    assert (report["from_version"], report["from_digest"]) == (
        running["version"],
        running["digest"],
    )
    assert stage.server_reports(device.device_id)[-1] == ("failed", expected)
    seen = stage.server_view(device.device_id)
    assert (seen["last_outcome"], seen["version"], seen["digest"]) == (
        "failed",
        running["version"],
        running["digest"],
    )
    print(f"{device.device_id}: {expected}: {report['message'][:300]}")
    return report, proxy


def _device(stage: Stage, lineage: Lineage, name: str, model: str = "atk") -> Device:
    return stage.device(name, model, lineage.files[START], START)


def test_a_corrupted_blob_is_refused(stage: Stage, atk: Lineage) -> None:
    report, proxy = _attacked(stage, _device(stage, atk, "atk-flip"), flip_blobs, "hash_mismatch")
    tampered = proxy.exchanges(lambda e: e.tampered)
    assert len(tampered) >= 2  # every option of the plan was tried, and each refused
    assert report["message"].count("the signed hash is") == len(tampered)


def test_a_tampered_plan_is_refused(stage: Stage, atk: Lineage) -> None:
    """The plan points at other bytes: a made-up size and hash for the signed path (first
    option), or another *signed* blob (an old snapshot) passed off as the target."""
    with stage.admin() as admin:
        decoy = admin.get("/v1/models/atk/versions/0").json()

    def edit(plan: dict[str, Any]) -> dict[str, Any]:
        for index, option in enumerate(plan["options"]):
            for step in option["steps"]:
                if index == 0:
                    step.update(sha256=decoy["snapshot_sha256"], size=decoy["snapshot_size"])
                else:
                    step.update(
                        url=blob_url(decoy["snapshot_sha256"]),
                        target_path=snapshot_path("atk", decoy["snapshot_sha256"]),
                        sha256=decoy["snapshot_sha256"],
                        size=decoy["snapshot_size"],
                    )
        return plan

    report, proxy = _attacked(
        stage, _device(stage, atk, "atk-plan"), rewrite_plans(edit), "untrusted"
    )
    assert "size/hash differ from the signed ones" in report["message"]
    assert "target digest is not the signed one" in report["message"]
    assert proxy.exchanges(lambda e: e.path.startswith("/v1/blobs/")) == []


def test_expired_metadata_is_refused(stage: Stage, atk: Lineage) -> None:
    """A timestamp signed with the real key, newer than any, but expired: no freeze."""
    current = httpx.get(f"{stage.server.url}/tuf/timestamp.json").content
    md = Metadata[Timestamp].from_bytes(current)
    md.signed.version += 1000
    md.signed.expires = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    md.signatures.clear()
    md.sign(load_online_keys(stage.server.data_dir / "keys" / "online").timestamp)
    expired = md.to_bytes(JSONSerializer(compact=True))

    report, proxy = _attacked(
        stage,
        _device(stage, atk, "atk-expired"),
        serve("/tuf/timestamp.json", expired),
        "untrusted",
    )
    assert "Expired" in report["message"]
    assert proxy.exchanges(lambda e: e.tampered)
    assert proxy.exchanges(lambda e: e.path.startswith("/v1/blobs/")) == []


def test_replayed_old_metadata_is_refused(stage: Stage, tmp_path_factory: Any) -> None:
    """A device that has seen timestamp N is served an older, validly signed one."""
    lineage = make_lineage(tmp_path_factory.mktemp("lineage-rpl"), 5, rows=256, seed=7)
    old = httpx.get(f"{stage.server.url}/tuf/timestamp.json").content
    stage.publish("rpl", lineage, range(4))
    device = stage.device("rpl-1", "rpl", lineage.files[0], 0)
    with ChaosProxy(stage.server.url) as proxy:
        assert device.run_once(proxy.url).returncode == 0
    assert device.assert_valid()["version"] == 3
    trusted = Metadata[Timestamp].from_bytes((device.state / "tuf" / "timestamp.json").read_bytes())
    replayed = Metadata[Timestamp].from_bytes(old)
    assert replayed.signed.version < trusted.signed.version
    assert not replayed.signed.is_expired()  # validly signed and fresh: only older

    stage.publish("rpl", lineage, [4])
    report, proxy = _attacked(stage, device, serve("/tuf/timestamp.json", old), "untrusted")
    assert "BadVersionNumberError" in report["message"]
    assert proxy.exchanges(lambda e: e.path.startswith("/v1/blobs/")) == []


def test_a_downgrade_is_refused(stage: Stage, tmp_path_factory: Any) -> None:
    """The operator retires the newest versions: the server now offers an older model."""
    lineage = make_lineage(tmp_path_factory.mktemp("lineage-dg"), 6, rows=256, seed=9)
    stage.publish("dg", lineage, range(6))
    device = stage.device("dg-1", "dg", lineage.files[5], 5)
    with stage.admin() as admin:
        for number in (5, 4):
            r = admin.patch(f"/v1/models/dg/versions/{number}", json={"retired": True})
            assert r.status_code == 200, r.text
    report, proxy = _attacked(stage, device, None, "downgrade_refused")
    assert "older than the installed 5" in report["message"]
    assert report["to_version"] == 3
    # refused from the signed version, before downloading it (or every poll would)
    assert proxy.exchanges(lambda e: e.path.startswith("/v1/blobs/")) == []


@pytest.mark.parametrize(
    ("name", "tamper"),
    [("append", append_to_blobs(4096)), ("endless", endless_blobs)],
)
def test_a_blob_longer_than_signed_is_refused(
    stage: Stage, atk: Lineage, name: str, tamper: Tamper
) -> None:
    report, proxy = _attacked(stage, _device(stage, atk, f"atk-{name}"), tamper, "length_exceeded")
    blobs = proxy.exchanges(lambda e: e.path.startswith("/v1/blobs/"))
    assert blobs
    assert report["message"].count("more than its signed length") == len(blobs)
    # the agent hung up: the proxy never got near the end of its endless data
    assert all(e.sent < ENDLESS_CAP // 4 for e in blobs)
