"""Observability: ``/metrics`` (per route template, blob bytes by kind, the counters the
device API calls, several workers summed), request ids and JSON logs."""

# The API tests' fixtures are imported below; test arguments then shadow the imports.
# ruff: noqa: F811

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server import metrics
from server.logging_setup import configure_logging
from tests.integration.live import live_server
from tests.lineage import Lineage
from tests.server.api.conftest import (  # noqa: F401  (fixtures)
    client,
    keys_dir,
    lineage,
    pg_url,
    publish_lineage,
    settings,
)


def sample(name: str, **labels: str) -> float:
    """This process's value of one series (0 when it does not exist yet)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_requests_are_counted_by_route_template(client: TestClient) -> None:
    labels = {"method": "GET", "route": "/v1/releases/{release_id}", "status": "404"}
    before = sample("diffcast_http_requests_total", **labels)
    timed = sample("diffcast_http_request_duration_seconds_count", **labels)
    for release in (9991, 9992):
        assert client.get(f"/v1/releases/{release}").status_code == 404
    assert sample("diffcast_http_requests_total", **labels) == before + 2
    assert sample("diffcast_http_request_duration_seconds_count", **labels) == timed + 2
    unmatched = {"method": "GET", "route": "<unmatched>", "status": "404"}
    before_unmatched = sample("diffcast_http_requests_total", **unmatched)
    client.get("/no/such/path/1234")
    assert sample("diffcast_http_requests_total", **unmatched) == before_unmatched + 1

    response = client.get("/metrics", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "/v1/releases/9991" not in response.text  # raw paths never become labels
    assert "/no/such/path" not in response.text
    series = scrape(response.text)
    assert series[("diffcast_http_requests_total", frozenset(labels.items()))] >= 2
    static = {"method": "GET", "route": "/dashboard/static/{path}", "status": "200"}
    before_static = sample("diffcast_http_requests_total", **static)
    client.get("/dashboard/static/dashboard.css")
    assert sample("diffcast_http_requests_total", **static) == before_static + 1


def test_blob_bytes_are_counted_by_kind(client: TestClient, lineage: Lineage) -> None:
    publish_lineage(client, lineage, upto=1)
    v1 = client.get("/v1/models/asr/versions/1").json()
    snapshot, size = v1["snapshot_sha256"], v1["snapshot_size"]
    before = {k: sample("diffcast_blob_bytes_total", kind=k) for k in ("snapshot", "diff")}

    assert len(client.get(f"/v1/blobs/{snapshot}").content) == size
    assert client.get(f"/v1/blobs/{snapshot}", headers={"Range": "bytes=0-9"}).status_code == 206
    assert client.head(f"/v1/blobs/{snapshot}").status_code == 200  # HEAD sends no body
    assert (
        client.get(f"/v1/blobs/{snapshot}", headers={"If-None-Match": f'"{snapshot}"'}).status_code
        == 304
    )
    assert sample("diffcast_blob_bytes_total", kind="snapshot") == before["snapshot"] + size + 10

    diff = client.get(f"/v1/blobs/{v1['diff_sha256']}")
    assert diff.status_code == 200
    assert sample("diffcast_blob_bytes_total", kind="diff") == before["diff"] + v1["diff_size"]


def test_device_counters() -> None:
    before_plan = sample("diffcast_plans_total", kind="chain")
    before_poll = sample("diffcast_polls_total", result="not_modified")
    metrics.observe_plan("chain")
    metrics.observe_poll("not_modified")
    metrics.observe_poll("not_modified")
    assert sample("diffcast_plans_total", kind="chain") == before_plan + 1
    assert sample("diffcast_polls_total", result="not_modified") == before_poll + 2

    cases = [
        ("failed", "Digest_Mismatch", "digest_mismatch"),
        ("failed", "<script>alert(1)</script>", "other"),
        ("updated", None, "none"),
    ]
    for outcome, reason, label in cases:
        before = sample("diffcast_reports_total", outcome=outcome, reason=label)
        metrics.observe_report(outcome, reason)
        assert sample("diffcast_reports_total", outcome=outcome, reason=label) == before + 1

    before_bytes = sample("diffcast_blob_bytes_total", kind="composed")
    metrics.observe_blob_bytes("composed", 1234)
    metrics.observe_blob_bytes("composed", 0)
    assert sample("diffcast_blob_bytes_total", kind="composed") == before_bytes + 1234


def test_reason_labels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_seen_reasons", {f"r{i}" for i in range(metrics.MAX_REASONS)})
    assert metrics.reason_label("r3") == "r3"
    assert metrics.reason_label("brand_new") == "other"
    assert metrics.reason_label("x" * 65) == "other"


def test_request_ids_and_json_access_lines(client: TestClient) -> None:
    sink = io.StringIO()
    configure_logging(stream=sink)
    try:
        echoed = client.get("/v1/releases/777", headers={"X-Request-ID": "trace-abc.123"})
        fresh = client.get("/healthz", headers={"X-Request-ID": b"bad id\xe9" + b"x" * 200})
        assert echoed.headers["x-request-id"] == "trace-abc.123"
        assert len(fresh.headers["x-request-id"]) == 32  # a new one: the sent one was junk
    finally:
        configure_logging()
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    first, second = (line for line in lines if line["logger"] == "diffcast.access")
    assert first["request_id"] == "trace-abc.123"
    assert (first["method"], first["path"], first["route"], first["status"]) == (
        "GET",
        "/v1/releases/777",
        "/v1/releases/{release_id}",
        404,
    )
    assert first["level"] == "info" and first["msg"] == "request"
    assert first["duration_ms"] >= 0 and first["bytes"] > 0
    assert first["ts"].endswith("Z")
    assert second["request_id"] == fresh.headers["x-request-id"]
    assert "Authorization" not in sink.getvalue() and "Bearer" not in sink.getvalue()


def test_log_lines_inside_a_request_carry_its_id() -> None:
    import logging

    from server.logging_setup import JsonFormatter, request_id

    record = logging.LogRecord(
        "diffcast.x", logging.WARNING, __file__, 1, "hi %s", ("there",), None
    )
    token = request_id.set("rid-1")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(token)
    assert line["msg"] == "hi there" and line["request_id"] == "rid-1"
    assert line["level"] == "warning"


def test_several_workers_are_summed(tmp_path: Path) -> None:
    """Two uvicorn workers in multiprocess mode: every scrape shows both workers' requests."""
    shared = tmp_path / "prometheus"
    shared.mkdir()

    def writers() -> set[str]:
        return {path.stem.rsplit("_", 1)[-1] for path in shared.glob("counter_*.db")}

    healthz = frozenset({"method": "GET", "route": "/healthz", "status": "200"}.items())
    with live_server(tmp_path / "server", workers=2, PROMETHEUS_MULTIPROC_DIR=str(shared)) as live:
        # A fresh connection each time, until both workers have answered some (the
        # server is ready when one is; the other may still be starting).
        sent, deadline = 0, time.monotonic() + 60
        while sent < 20 or (len(writers()) < 2 and time.monotonic() < deadline):
            assert httpx.get(f"{live.url}/healthz", timeout=10).status_code == 200
            sent += 1
        assert len(writers()) == 2, f"one worker answered all {sent} requests"
        for _ in range(4):
            text = httpx.get(f"{live.url}/metrics", timeout=10).text
            assert scrape(text)[("diffcast_http_requests_total", healthz)] == sent
