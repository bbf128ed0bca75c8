"""Prometheus metrics: what the service counts, the request middleware, and ``/metrics``.

Metric names (all prefixed ``diffcast_``)::

    http_requests_total{method, route, status}              requests answered
    http_request_duration_seconds{method, route, status}    histogram, until the body is sent
    polls_total{result}            device polls: update | current | not_modified
    plans_total{kind}              update plans served, by cheapest option: chain | composed
                                   | full (none when the device is current)
    blob_bytes_total{kind}         blob bytes served: snapshot | diff | composed | unknown
    reports_total{outcome, reason} device reports: updated | failed | rolled_back | current

Invariants:

- ``route`` is the route *template* (``/v1/releases/{release_id}``), never the raw path,
  and ``<unmatched>`` for a path no route matched; so label sets stay small whatever
  clients send. ``reason`` comes from devices, so it is reduced to a code
  (``[a-z0-9_.-]``, 64 characters at most) and to at most :data:`MAX_REASONS` distinct
  values per process; the rest count as ``other``.
- One worker: metrics live in this module's :data:`REGISTRY` (plus process and GC
  collectors). Several workers (``uvicorn --workers N``): start them with
  ``PROMETHEUS_MULTIPROC_DIR`` naming an empty directory (prometheus_client reads it
  when it is imported); every worker then writes its values there and ``/metrics``,
  whichever worker answers, sums them all. Empty the directory before each start.

Where the counters are called: ``observe_blob_bytes`` in ``server.api.routes.blobs``;
``observe_poll`` and ``observe_plan`` belong in the device poll handler, and
``observe_report`` in the report handler (``server.api.routes.devices``).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_REASONS = 64
UNMATCHED = "<unmatched>"
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

REGISTRY = CollectorRegistry(auto_describe=True)
"""This process's metrics (the only registry exposed when there is one worker)."""
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

HTTP_REQUESTS = Counter(
    "diffcast_http_requests",
    "HTTP requests answered, by route template and status.",
    ("method", "route", "status"),
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "diffcast_http_request_duration_seconds",
    "Time from request to the last byte of the response, by route template and status.",
    ("method", "route", "status"),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
POLLS = Counter(
    "diffcast_polls",
    "Device polls, by result: update (a plan), current (nothing to do), not_modified (304).",
    ("result",),
    registry=REGISTRY,
)
PLANS = Counter(
    "diffcast_plans",
    "Update plans served, by the kind of their cheapest option: chain, composed, full.",
    ("kind",),
    registry=REGISTRY,
)
BLOB_BYTES = Counter(
    "diffcast_blob_bytes",
    "Blob bytes served, by blob kind: snapshot, diff, composed.",
    ("kind",),
    registry=REGISTRY,
)
REPORTS = Counter(
    "diffcast_reports",
    "Device reports, by outcome and failure reason.",
    ("outcome", "reason"),
    registry=REGISTRY,
)

_REASON = re.compile(r"^[a-z0-9_.-]{1,64}$")
_seen_reasons: set[str] = set()


def observe_poll(result: str) -> None:
    """A device poll was answered: ``update``, ``current`` or ``not_modified``."""
    POLLS.labels(result=result).inc()


def observe_plan(kind: str) -> None:
    """An update plan was served; ``kind`` is its first (cheapest) option's kind."""
    PLANS.labels(kind=kind).inc()


def observe_blob_bytes(kind: str, n: int) -> None:
    """``n`` bytes of a blob of ``kind`` were served."""
    if n > 0:
        BLOB_BYTES.labels(kind=kind).inc(n)


def reason_label(reason: str | None) -> str:
    """A bounded label for a device-supplied failure reason."""
    if reason is None:
        return "none"
    code = reason.strip().lower()
    if not _REASON.match(code):
        return "other"
    if code not in _seen_reasons:
        if len(_seen_reasons) >= MAX_REASONS:
            return "other"
        _seen_reasons.add(code)
    return code


def observe_report(outcome: str, reason: str | None) -> None:
    """A device reported ``outcome`` (``reason`` for failures, else ``None``)."""
    REPORTS.labels(outcome=outcome, reason=reason_label(reason)).inc()


def exposition() -> tuple[bytes, str]:
    """The metrics text and its content type: every worker's sum in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def route_template(scope: Scope, root_path: str = "") -> str:
    """The template of the route that answered, else ``<unmatched>``.

    Call it after the app ran: the router leaves the matched route in the scope. A
    mounted app (static files) leaves no route but extends ``root_path`` beyond the
    ``root_path`` the request came in with; that prefix then names it (``/prefix/{path}``).
    """
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str) and path:
        return path
    mounted = str(scope.get("root_path", ""))
    if len(mounted) > len(root_path) and mounted.startswith(root_path):
        return mounted[len(root_path) :] + "/{path}"
    return UNMATCHED


class MetricsMiddleware:
    """Counts every HTTP request and times it, labelled by route template and status.

    A plain ASGI middleware (no per-request task or body buffering). A request whose
    handler raised before answering counts as 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        root_path = str(scope.get("root_path", ""))
        status = 499

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException:
            if status == 499:
                status = 500
            raise
        finally:
            labels = (scope["method"], route_template(scope, root_path), str(status))
            HTTP_REQUESTS.labels(*labels).inc()
            HTTP_LATENCY.labels(*labels).observe(time.perf_counter() - started)


__all__ = [
    "REGISTRY",
    "MetricsMiddleware",
    "exposition",
    "observe_blob_bytes",
    "observe_plan",
    "observe_poll",
    "observe_report",
    "reason_label",
]
