"""A loopback HTTP proxy that breaks, slows and tampers with what the server sends.

Agents point at :attr:`ChaosProxy.url` instead of the server. Each connection carries
one request (the proxy answers ``Connection: close``): the request is forwarded to the
server, the whole answer read, and then delivered to the agent -- as it was, or

- **cut**: blob answers (``GET /v1/blobs/...``) are cut after a random number of body
  bytes with probability :attr:`ChaosProxy.cut_probability` (seeded), so a download
  must resume with ``Range``;
- **throttled**: blob bodies trickle at :attr:`ChaosProxy.rate` bytes per second, so a
  download lasts long enough to be interrupted;
- **tampered**: :attr:`ChaosProxy.tamper` rewrites any answer (see :func:`flip_blobs`,
  :func:`append_to_blobs`, :func:`endless_blobs`, :func:`rewrite_plans`, :func:`serve`).

Every exchange is logged (:attr:`ChaosProxy.log`) with the body bytes actually sent, so a
test can count what crossed the wire.

Below the proxy, the harness the chaos tests share: one live server for the session
(:func:`stage_fixture`; each test publishes its own model names), devices provisioned
from its bundle (:class:`Stage`), and real ``diffcast agent`` processes (:class:`Device`).
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import socketserver
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from device_agent.provision import provision
from device_agent.state import read_json
from diffs.digest import file_digest
from tests.integration.conftest import AGENT
from tests.integration.live import LiveServer, live_server
from tests.lineage import Lineage

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
    }
)
MAX_HEAD = 64 * 1024
SLICE = 16 * 1024
ENDLESS_CAP = 256 * 1024**2
"""An endless answer stops here if the client never hangs up (it must, long before)."""


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    """Path and query, as sent."""
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def is_blob(self) -> bool:
        return self.method == "GET" and self.path.startswith("/v1/blobs/")

    @property
    def is_plan(self) -> bool:
        return self.method == "GET" and self.path.endswith("/update")


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    cut_after: int | None = None
    """Send only this many body bytes (announcing them all), then drop the connection."""
    endless: bool = False
    """After the body, send junk without end (no length announced) until the client quits."""

    @property
    def ok(self) -> bool:
        return self.status in (200, 206)


Tamper = Callable[[Request, Response], Response]


@dataclass
class Exchange:
    method: str
    path: str
    range: str | None
    status: int
    body_length: int
    sent: int
    """Body bytes the proxy managed to write to the client."""
    cut: bool
    tampered: bool


@dataclass
class ChaosProxy:
    upstream: str
    seed: int = 0
    cut_probability: float = 0.0
    rate: float | None = None
    """Blob body bytes per second (``None``: as fast as the socket takes them)."""
    tamper: Tamper | None = None
    log: list[Exchange] = field(default_factory=list)

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start the proxy first"
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def start(self) -> ChaosProxy:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- accounting -------------------------------------------------------------------

    def exchanges(self, predicate: Callable[[Exchange], bool] = lambda _: True) -> list[Exchange]:
        with self._lock:
            return [e for e in self.log if predicate(e)]

    @property
    def blob_bytes(self) -> int:
        """Blob body bytes delivered to clients (cut answers count what was sent)."""
        return sum(e.sent for e in self.exchanges(lambda e: e.path.startswith("/v1/blobs/")))

    @property
    def cuts(self) -> int:
        return len(self.exchanges(lambda e: e.cut))

    def reset(self) -> None:
        with self._lock:
            self.log.clear()

    # --- one connection ---------------------------------------------------------------

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(120)
        try:
            request = _read_request(client)
            if request is None:
                return
            response = self._forward(request)
            if request.is_blob and response.ok and response.body and self.cut_probability:
                with self._lock:
                    if self._rng.random() < self.cut_probability:
                        response = replace(
                            response, cut_after=self._rng.randrange(len(response.body))
                        )
            tampered = False
            if self.tamper is not None:
                changed = self.tamper(request, response)
                tampered = changed is not response
                response = changed
            sent = self._deliver(client, request, response)
            with self._lock:
                self.log.append(
                    Exchange(
                        request.method,
                        request.path,
                        request.header("range"),
                        response.status,
                        len(response.body),
                        sent,
                        response.cut_after is not None,
                        tampered,
                    )
                )
        except (OSError, http.client.HTTPException):
            pass  # the agent or the server hung up: nothing more to deliver
        finally:
            with suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()

    def _forward(self, request: Request) -> Response:
        conn = http.client.HTTPConnection(*self._upstream, timeout=120)
        try:
            headers = {k: v for k, v in request.headers if k.lower() not in HOP_BY_HOP}
            conn.request(request.method, request.target, body=request.body or None, headers=headers)
            answer = conn.getresponse()
            body = answer.read()
            kept = [(k, v) for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP]
            if request.method == "HEAD":
                length = answer.getheader("content-length")
                if length is not None:
                    kept.append(("Content-Length", length))
            return Response(answer.status, answer.reason, kept, body)
        finally:
            conn.close()

    def _deliver(self, client: socket.socket, request: Request, response: Response) -> int:
        headers = list(response.headers)
        bodiless = request.method == "HEAD" or response.status in (204, 304)
        if not bodiless and not response.endless:
            headers.append(("Content-Length", str(len(response.body))))
        headers.append(("Connection", "close"))
        head = f"HTTP/1.1 {response.status} {response.reason}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        client.sendall(head.encode("latin-1"))
        if bodiless:
            return 0
        body = response.body
        if response.cut_after is not None:
            body = body[: response.cut_after]
        sent = 0
        try:
            for chunk in self._slices(body, request.is_blob):
                client.sendall(chunk)
                sent += len(chunk)
            if response.endless:
                junk = bytes(range(256)) * (SLICE // 256)
                while sent < ENDLESS_CAP:
                    client.sendall(junk)
                    sent += len(junk)
        except OSError:
            pass  # the client hung up (or was killed): count what went out
        return sent

    def _slices(self, body: bytes, throttle: bool) -> Iterator[bytes]:
        rate = self.rate if throttle else None
        started = time.monotonic()
        for offset in range(0, len(body), SLICE):
            if rate:
                due = started + offset / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            yield body[offset : offset + SLICE]


def _read_request(client: socket.socket) -> Request | None:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = client.recv(65536)
        if not data:
            return None
        buffer += data
        if len(buffer) > MAX_HEAD:
            return None
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
    while len(rest) < length:
        data = client.recv(65536)
        if not data:
            return None
        rest += data
    return Request(method, target, headers, rest[:length])


# --- tampering ----------------------------------------------------------------------


def flip_blobs(request: Request, response: Response) -> Response:
    """Every blob arrives with the right length and some bytes flipped."""
    if not (request.is_blob and response.ok and response.body):
        return response
    body = bytearray(response.body)
    for offset in range(0, len(body), max(1, len(body) // 7)):
        body[offset] ^= 0xFF
    return replace(response, body=bytes(body))


def append_to_blobs(extra: int = 4096) -> Tamper:
    """Every blob arrives ``extra`` bytes longer than it is (and says so)."""

    def tamper(request: Request, response: Response) -> Response:
        if not (request.is_blob and response.ok):
            return response
        return replace(response, body=response.body + b"\0" * extra)

    return tamper


def endless_blobs(request: Request, response: Response) -> Response:
    """Every blob is followed by junk without end, and no length is announced."""
    if not (request.is_blob and response.ok):
        return response
    return replace(response, endless=True)


def rewrite_plans(edit: Callable[[dict[str, Any]], dict[str, Any]]) -> Tamper:
    """Plans (``GET /v1/devices/<id>/update`` answers) pass through ``edit``."""

    def tamper(request: Request, response: Response) -> Response:
        if not (request.is_plan and response.status == 200):
            return response
        return replace(response, body=json.dumps(edit(json.loads(response.body))).encode())

    return tamper


def serve(path: str, body: bytes) -> Tamper:
    """Answer ``GET <path>`` with ``body`` (e.g. replayed or expired metadata)."""

    def tamper(request: Request, response: Response) -> Response:
        if request.method != "GET" or request.path != path:
            return response
        headers = [(k, v) for k, v in response.headers if k.lower() != "etag"]
        return replace(response, status=200, reason="OK", headers=headers, body=body)

    return tamper


# --- the harness the chaos tests share ----------------------------------------------


@dataclass
class Device:
    """A device's state directory, run by real ``diffcast agent`` processes."""

    state: Path
    device_id: str
    model: str

    def args(self, server_url: str, *extra: str) -> list[str]:
        return [
            *AGENT,
            "agent",
            "run",
            "--server",
            server_url,
            "--state-dir",
            str(self.state),
            "--model",
            self.model,
            *extra,
        ]

    def run_once(self, server_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.args(server_url, "--once", *extra),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def spawn(self, server_url: str, *extra: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.args(server_url, *extra),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def current(self) -> dict[str, Any] | None:
        return read_json(self.state / "current.json")  # type: ignore[no-any-return]

    def journal(self) -> dict[str, Any] | None:
        try:
            return read_json(self.state / "journal.json")  # type: ignore[no-any-return]
        except ValueError:  # pragma: no cover - written atomically, never half
            return None

    def live_model(self) -> tuple[bytes, bytes]:
        """``current.json`` and the model file it names, byte for byte."""
        raw = (self.state / "current.json").read_bytes()
        name = json.loads(raw)["file"]
        return raw, (self.state / "models" / name).read_bytes()

    def assert_valid(self) -> dict[str, Any]:
        """The live model is a complete file whose canonical digest is the one recorded."""
        current = self.current()
        assert current is not None, f"{self.device_id} has no live model"
        path = self.state / "models" / current["file"]
        assert path.is_file(), f"{self.device_id}: {path.name} is missing"
        assert file_digest(path) == current["digest"], f"{self.device_id}: damaged live model"
        return current

    def reports(self) -> list[dict[str, Any]]:
        """The reports the server accepted (the device's delivered history)."""
        log = self.state / "reports.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

    def refused(self) -> list[str]:
        refused: list[str] = read_json(self.state / "refused.json") or []
        return refused


@dataclass
class Stage:
    """The live server, its admin client and provisioning bundle, and a place for devices."""

    server: LiveServer
    bundle: dict[str, Any]
    root: Path

    def admin(self) -> httpx.Client:
        return self.server.client()

    def publish(self, model: str, lineage: Lineage, numbers: Iterable[int]) -> None:
        """Publish versions ``numbers`` of ``lineage`` as ``model`` (created when new)."""
        with self.admin() as client:
            if client.get(f"/v1/models/{model}/versions").status_code == 404:
                assert client.post("/v1/models", json={"name": model}).status_code == 201
            for number in numbers:
                if number == 0:
                    r = client.post(
                        f"/v1/models/{model}/versions", content=lineage.files[0].read_bytes()
                    )
                else:
                    r = client.post(
                        f"/v1/models/{model}/versions",
                        params={"parent": number - 1},
                        content=lineage.diffs[number - 1],
                    )
                assert r.status_code == 201, r.text
                assert r.json()["digest"] == lineage.digests[number]

    def device(
        self, device_id: str, model: str, initial: Path | None, version: int | None
    ) -> Device:
        """Provision a fresh device (as a factory would) with ``initial`` as its model."""
        state = self.root / device_id
        provision(
            state,
            self.bundle,
            device_id=device_id,
            initial_model=initial,
            model_name=model,
            initial_version=version,
        )
        return Device(state, device_id, model)

    def server_view(self, device_id: str) -> dict[str, Any]:
        with self.admin() as client:
            r = client.get(f"/v1/devices/{device_id}")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def server_reports(self, device_id: str) -> list[tuple[str, str | None]]:
        """(outcome, reason) of every report the server stored for the device, in order."""
        database = f"file:{self.server.data_dir / 'diffcast.db'}?mode=ro"
        with closing(sqlite3.connect(database, uri=True)) as db:
            rows = db.execute(
                "SELECT outcome, reason FROM reports WHERE device_id = ? ORDER BY id", (device_id,)
            ).fetchall()
        return [(str(o), r) for o, r in rows]


@pytest.fixture(scope="session", name="stage")
def stage_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    """One live server for every chaos test (import this fixture into the test module)."""
    with live_server(tmp_path_factory.mktemp("chaos-server")) as server:
        with server.client() as client:
            bundle = client.get("/v1/provisioning")
            assert bundle.status_code == 200, bundle.text
        yield Stage(server, bundle.json(), tmp_path_factory.mktemp("devices"))
