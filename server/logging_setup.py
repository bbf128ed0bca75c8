"""Structured logs: one JSON object per line, and one line per HTTP request.

Every request gets a request id: the client's ``X-Request-ID`` when it sent a sane one
(1-128 of ``A-Z a-z 0-9 . _ : -``), else a fresh random one. The id is returned in the
response's ``X-Request-ID`` header and stamped on every log line written while the
request is handled (it lives in a context variable, which the thread pool copies into
sync handlers).

An access line looks like::

    {"ts": "2025-01-01T12:00:00.123Z", "level": "info", "logger": "diffcast.access",
     "msg": "request", "request_id": "3f2a...", "method": "GET",
     "path": "/v1/releases/3", "route": "/v1/releases/{release_id}", "status": 200,
     "duration_ms": 4.21, "bytes": 812, "client": "127.0.0.1"}

Credentials never appear: neither headers nor query strings are logged. Access lines
are ``INFO`` records of the ``diffcast.access`` logger; raise its level to turn them off.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from contextvars import ContextVar
from typing import IO, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import route_template

ROOT_LOGGER = "diffcast"
ACCESS_LOGGER = "diffcast.access"
REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
request_id: ContextVar[str | None] = ContextVar("diffcast_request_id", default=None)

# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        millis = int(record.msecs)
        payload: dict[str, Any] = {
            "ts": f"{time.strftime('%Y-%m-%dT%H:%M:%S', seconds)}.{millis:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid:
            payload["request_id"] = rid
        fields = vars(record)
        for key in fields.keys() - _STANDARD - payload.keys():
            payload[key] = fields[key]
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, separators=(",", ":"))


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr


def configure_logging(level: int | str = logging.INFO, stream: IO[str] | None = None) -> None:
    """Send the ``diffcast`` loggers' records to ``stream`` (default: stderr) as JSON.

    Idempotent: a second call replaces the handler the first one installed.
    """
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(logger.handlers):
        if getattr(handler, "diffcast_json", False):
            logger.removeHandler(handler)
    new: logging.Handler = (
        _CurrentStderrHandler() if stream is None else logging.StreamHandler(stream)
    )
    new.setFormatter(JsonFormatter())
    new.diffcast_json = True  # type: ignore[attr-defined]
    logger.addHandler(new)
    logger.setLevel(level)
    logger.propagate = False


def incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            return text if _REQUEST_ID.match(text) else None
    return None


class RequestLogMiddleware:
    """Assigns the request id, echoes it in the response, and logs one line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = incoming_request_id(scope) or os.urandom(16).hex()
        token = request_id.set(rid)
        started = time.perf_counter()
        root_path = str(scope.get("root_path", ""))
        status = 0
        sent = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER, rid.encode("latin-1")))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = status or 500
            raise
        finally:
            if self.log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                fields = {
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route_template(scope, root_path),
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    "bytes": sent,
                    "client": client[0] if client else None,
                }
                # makeRecord + handle: the same as .info() without the caller lookup,
                # which would walk the stack on every request.
                record = self.log.makeRecord(
                    ACCESS_LOGGER, logging.INFO, __file__, 0, "request", (), None, extra=fields
                )
                self.log.handle(record)
            request_id.reset(token)


__all__ = [
    "JsonFormatter",
    "RequestLogMiddleware",
    "configure_logging",
    "request_id",
]
