"""Load on the update server: an up-to-date fleet polling, then a release arriving.

The server runs as operators run it: a subprocess ``diffcast server run --workers N``
(or ``uvicorn server.app:app_from_env --factory``) configured only by ``DIFFCAST_*``
environment variables, on SQLite and on PostgreSQL (a database created for the run and
dropped afterwards). Everything is set up over REST: a model with a base and a few
diffs, a separate ~64 MB model for the blob download figure, and ``--devices`` enrolled
devices, each with its own credential. Then, from this (separate) process:

- **up-to-date polls, closed loop**: ``--connections`` (64) connections send
  ``GET /v1/devices/{id}/update?model=asr&digest=<latest>`` back to back, cycling
  through all devices, each with its own ``Authorization: Bearer``; the answer is
  ``200 {"status": "current"}``. Also the same with ``If-None-Match`` (``304``);
- **up-to-date polls, open loop**: ``--rate`` (1,000) polls/s at fixed intended send
  times, spread over the devices (each polls once a second); latency is measured from
  the *intended* send time, so a stalled server is charged for every poll it delays
  (no coordinated omission). Over a keep-alive connection pool (a fleet behind a
  reverse proxy), and with a new TCP connection per poll;
- **a release**: a new version is published; the first plan per source version builds
  a composed diff (timed, cold); then plan requests/s, closed loop, of the fleet at the
  previous latest (a one-diff chain and the full snapshot), and of a fleet spread over
  all older versions (composed diffs, warm);
- **blob downloads**: ``GET /v1/blobs/<sha>`` of the big snapshot over ``--blob-connections``.

Load generators: closed loops use ``wrk`` (the Debian package; C, epoll; the script
``bench/server_load.lua`` gives every request its device's path and credential), because
on a 2-core machine the generator shares the CPU with the server, and wrk costs a
fraction of what a Python client does per request. wrk cannot hold a fixed rate, so the
open loop is an asyncio (uvloop) generator in this file with a minimal HTTP/1.1 client;
it is also the closed-loop fallback when wrk is missing (``--client python``).

Before the main measurements, ``--sweep-workers`` runs the closed-loop poll figure with
other worker counts (each its own server). Every closed-loop and open-loop figure is
measured ``--repeats`` times (best and median reported) with the CPU time the server's
processes and the generator used per request: other engineers' jobs share the machine,
so throughput varies with their load (the load average is recorded), while CPU per
request varies much less and gives what the cores would sustain with nothing else on
them. Prints a table and writes every figure, with the machine, to JSON
(``bench/results/server_load.json`` by default).

Run: ``.venv/bin/python bench/server_load.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine_info as common_machine_info  # noqa: E402
from diffs.model import Tensor, save_model  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.lineage import Lineage, fine_tunes  # noqa: E402

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "server_load.json"
LUA_SCRIPT = ROOT / "bench" / "server_load.lua"
VENV_BIN = Path(sys.executable).parent
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ADMIN_TOKEN = "dct_bench-admin-token"
ENROLL_SECRET = "bench-enrollment-secret"
MODEL = "asr"
BIG_MODEL = "asr-big"
LINEAGE_VERSIONS = 5
"""Published before the load (v0..v4); the release is v5."""
TARGETS = {"poll_rps": 2000.0, "open_p99_ms": 50.0, "blob_mb_s": 500.0}
MB = 1e6


# --------------------------------------------------------------------------------------
# Models to publish


def make_lineage(out: Path, versions: int, seed: int = 11) -> Lineage:
    """``versions`` models; each changes ~5% of the previous one's weights slightly."""
    rng = np.random.default_rng(seed)
    first = {
        "encoder.weight": Tensor.of(rng.standard_normal((256, 240)).astype(np.float32)),
        "encoder.bias": Tensor.of(rng.standard_normal(256).astype(np.float32)),
        "ctc.weight": Tensor.of(rng.standard_normal((32, 256)).astype(np.float16)),
    }
    return fine_tunes(out, first, versions, rng)


def make_big_model(out: Path, size: int, seed: int = 5) -> Path:
    """A float32 model of about ``size`` bytes (random, so it does not compress)."""
    rng = np.random.default_rng(seed)
    rows = max(1, size // (4 * 4096))
    path = out / "big.safetensors"
    weight = rng.standard_normal((rows, 4096), dtype=np.float32)
    save_model(path, {"encoder.weight": Tensor.of(weight)})
    return path


# --------------------------------------------------------------------------------------
# The server, as operators run it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Database:
    kind: str
    url: str | None
    """``None``: the embedded default (SQLite under the data directory)."""
    drop: Callable[[], None] = lambda: None


@contextlib.contextmanager
def database(kind: str, admin_url: str) -> Iterator[Database]:
    if kind == "sqlite":
        yield Database(kind, None)
        return
    import psycopg

    name = f"diffcast_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield Database(kind, f"{base}/{name}")
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def server_env(data_dir: Path, db: Database) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFCAST_")}
    env.update(
        DIFFCAST_DATA_DIR=str(data_dir),
        DIFFCAST_BOOTSTRAP_TOKEN=ADMIN_TOKEN,
        DIFFCAST_ENROLLMENT_SECRET=ENROLL_SECRET,
        DIFFCAST_MIGRATE_ON_START="false",
    )
    if db.url:
        env["DIFFCAST_DATABASE_URL"] = db.url
    return env


def server_command(launcher: str, workers: int, port: int) -> list[str]:
    if launcher == "cli":
        return [
            str(VENV_BIN / "diffcast"),
            *("server", "run", "--workers", str(workers), "--port", str(port)),
        ]
    return [
        str(VENV_BIN / "uvicorn"),
        *("server.app:app_from_env", "--factory", "--workers", str(workers)),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]  # as documented in server.app: uvicorn's own access log stays on


class Server:
    """The server subprocess (its own process group, so its workers stop with it)."""

    def __init__(
        self, launcher: str, workers: int, env: dict[str, str], log: Path, port: int
    ) -> None:
        self.command = server_command(launcher, workers, port)
        self.workers = workers
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self._log = log
        self._env = env
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        with open(self._log, "ab") as log:
            self._process = subprocess.Popen(
                self.command,
                env=self._env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    # every worker answers before the load starts
                    time.sleep(0.5 + 0.2 * self.workers)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server did not become ready:\n{self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server's processes (its group)."""
        assert self._process is not None
        ticks = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            if int(fields[2]) == self._process.pid:  # process group
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------------------
# Set-up over REST


@dataclass
class Fleet:
    devices: list[tuple[str, str]]
    """(device id, credential)."""
    lineage: Lineage
    big_sha256: str
    big_size: int
    timings: dict[str, float] = field(default_factory=dict)

    def poll_path(self, device: str, digest: str) -> str:
        return f"/v1/devices/{device}/update?model={MODEL}&digest={digest}"


def admin_client(url: str) -> httpx.Client:
    return httpx.Client(
        base_url=url,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=httpx.Timeout(30.0, read=600.0),
    )


def check(response: httpx.Response, *expected: int) -> Any:
    if response.status_code not in expected:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {response.text[:300]}"
        )
    return response.json() if response.content else None


def publish_diff(client: httpx.Client, lineage: Lineage, number: int) -> None:
    check(
        client.post(
            f"/v1/models/{MODEL}/versions",
            params={"parent": number - 1},
            content=lineage.diffs[number - 1],
            headers={"Content-Type": "application/octet-stream"},
        ),
        201,
    )


def set_up(url: str, lineage: Lineage, big: Path, devices: int) -> Fleet:
    timings: dict[str, float] = {}
    with admin_client(url) as client:
        start = time.perf_counter()
        check(client.post("/v1/models", json={"name": MODEL}), 201)
        check(
            client.post(f"/v1/models/{MODEL}/versions", content=lineage.files[0].read_bytes()),
            201,
        )
        for number in range(1, LINEAGE_VERSIONS):
            publish_diff(client, lineage, number)
        timings["publish_lineage_s"] = time.perf_counter() - start

        start = time.perf_counter()
        check(client.post("/v1/models", json={"name": BIG_MODEL}), 201)
        with open(big, "rb") as body:
            version = check(
                client.post(
                    f"/v1/models/{BIG_MODEL}/versions",
                    content=body,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(big.stat().st_size),
                    },
                ),
                201,
            )
        timings["publish_big_s"] = time.perf_counter() - start

        start = time.perf_counter()
        fleet = []
        for i in range(devices):
            body = check(
                client.post(
                    "/v1/devices/enroll",
                    json={"enrollment_secret": ENROLL_SECRET, "device_id": f"dev-{i:05d}"},
                ),
                201,
            )
            fleet.append((body["device_id"], body["credential"]))
        timings["enroll_s"] = time.perf_counter() - start
    return Fleet(fleet, lineage, version["snapshot_sha256"], version["snapshot_size"], timings)


def probe(url: str, fleet: Fleet, digest: str, etag: str | None = None) -> httpx.Response:
    device, credential = fleet.devices[0]
    headers = {"Authorization": f"Bearer {credential}"}
    if etag:
        headers["If-None-Match"] = etag
    return httpx.get(url + fleet.poll_path(device, digest), headers=headers, timeout=30)


# --------------------------------------------------------------------------------------
# Requests, and the two load generators


@dataclass(frozen=True)
class Request:
    path: str
    credential: str | None = None
    etag: str | None = None

    def wire(self, port: int) -> bytes:
        lines = [f"GET {self.path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        if self.credential:
            lines.append(f"Authorization: Bearer {self.credential}")
        if self.etag:
            lines.append(f"If-None-Match: {self.etag}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class LoadResult:
    requests: int
    seconds: float
    bytes: int
    errors: int
    """Failed connections, non-2xx/3xx answers, timeouts."""
    latency_ms: dict[str, float]
    server_cpu_s: float = 0.0
    """CPU time (user + system) the server's processes used meanwhile."""
    client_cpu_s: float = 0.0
    """CPU time the load generator used (wrk, or this process)."""
    load_average: float = 0.0
    """The machine's 1-minute load average at the end (other jobs included)."""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / MB

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(self.rps, 1),
            "mb_per_s": round(self.mb_s, 1),
            "errors": self.errors,
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
            "server_cpu_us_per_request": round(self.server_cpu_s / max(self.requests, 1) * 1e6),
            "client_cpu_us_per_request": round(self.client_cpu_s / max(self.requests, 1) * 1e6),
            "load_average_1min": round(self.load_average, 2),
        }


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {}
    values = np.asarray(seconds) * 1e3
    p50, p90, p99, p999 = np.percentile(values, [50, 90, 99, 99.9])
    return {
        "mean": float(values.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "p999": float(p999),
        "max": float(values.max()),
    }


def run_wrk(
    url: str,
    requests: Sequence[Request],
    connections: int,
    seconds: float,
    threads: int,
    scratch: Path,
) -> LoadResult:
    listing = scratch / "wrk-requests.tsv"
    listing.write_text(
        "".join(f"{r.path}\t{r.credential or '-'}\t{r.etag or '-'}\n" for r in requests)
    )
    command = [
        "wrk",
        *("-t", str(min(threads, connections)), "-c", str(connections)),
        *("-d", f"{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(LUA_SCRIPT), url),
    ]
    env = {**os.environ, "DIFFCAST_BENCH_REQUESTS": str(listing)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("WRK_JSON "))
    raw = json.loads(line.removeprefix("WRK_JSON "))
    latency = {k: v / 1e3 for k, v in raw["latency_us"].items()}
    return LoadResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        bytes=raw["bytes"],
        errors=sum(raw["errors"].values()),
        latency_ms=latency,
    )


class HttpConnection(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive client: one request at a time, body counted and
    dropped. Enough for this server's answers (``Content-Length`` bodies, bodyless 304)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.requests = 0
        self._head = bytearray()
        self._body_left = -1
        self._status = 0
        self._waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc or ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self._body_left >= 0:
            self._body_left -= len(data)
        else:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self._head[:end].decode("latin-1").split("\r\n")
            self._status = int(lines[0].split(" ", 2)[1])
            length = 0
            if self._status >= 200 and self._status not in (204, 304):
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
            self._body_left = length - (len(self._head) - end - 4)
            self._head.clear()
        if self._body_left <= 0 and self._waiter is not None:
            self._body_left = -1
            waiter, self._waiter = self._waiter, None
            if not waiter.done():
                waiter.set_result(self._status)

    async def request(self, data: bytes) -> int:
        """Send one request; the answer's status once it has been read whole."""
        if self.transport is None:
            raise ConnectionError("connection closed")
        self.requests += 1
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(port: int) -> HttpConnection:
    _, protocol = await asyncio.get_running_loop().create_connection(
        HttpConnection, "127.0.0.1", port
    )
    return protocol


def _asyncio_run(coroutine: Any) -> Any:
    import uvloop

    gc.collect()
    gc.freeze()
    try:
        return uvloop.run(coroutine)
    finally:
        gc.unfreeze()


def python_closed_loop(
    port: int, requests: Sequence[Request], connections: int, seconds: float
) -> LoadResult:
    wires = [r.wire(port) for r in requests]

    async def main() -> LoadResult:
        conns = [await connect(port) for _ in range(connections)]
        latencies: list[float] = []
        errors = 0
        next_index = 0
        start = time.perf_counter()
        deadline = start + seconds

        async def worker(conn: HttpConnection) -> None:
            nonlocal errors, next_index
            while time.perf_counter() < deadline:
                wire = wires[next_index % len(wires)]
                next_index += 1
                sent = time.perf_counter()
                status = await conn.request(wire)
                latencies.append(time.perf_counter() - sent)
                errors += status >= 400

        await asyncio.gather(*(worker(c) for c in conns))
        elapsed = time.perf_counter() - start
        for conn in conns:
            conn.close()
        return LoadResult(
            len(latencies),
            elapsed,
            sum(c.received for c in conns),
            errors,
            percentiles_ms(latencies),
        )

    result: LoadResult = _asyncio_run(main())
    return result


@dataclass
class OpenLoopResult:
    offered_rps: float
    offered_requests: int
    load: LoadResult
    send_lag_ms: dict[str, float]
    """How late the generator itself sent (included in the latencies)."""
    max_connections: int

    def as_json(self) -> dict[str, Any]:
        return {
            "offered_per_s": self.offered_rps,
            "offered_requests": self.offered_requests,
            **self.load.as_json(),
            "generator_send_lag_ms": {k: round(v, 3) for k, v in self.send_lag_ms.items()},
            "max_open_connections": self.max_connections,
        }


def python_open_loop(
    port: int,
    requests: Sequence[Request],
    rate: float,
    seconds: float,
    new_connection: bool,
    warm_connections: int = 32,
) -> OpenLoopResult:
    """Send request ``i`` at ``start + i / rate`` whatever the answers do; a request
    takes an idle keep-alive connection or opens one (or always opens one).
    Latency runs from the intended send time to the last byte of the answer."""
    wires = [r.wire(port) for r in requests]
    total = max(1, round(rate * seconds))

    async def main() -> OpenLoopResult:
        made: list[HttpConnection] = []
        idle: list[HttpConnection] = []
        latencies: list[float] = []
        lags: list[float] = []
        errors = open_now = peak = 0

        async def acquire() -> HttpConnection:
            nonlocal open_now, peak
            while idle:
                conn = idle.pop()
                if conn.transport is not None:
                    return conn
                open_now -= 1  # the server closed it while idle (keep-alive timeout)
            conn = await connect(port)
            made.append(conn)
            open_now += 1
            peak = max(peak, open_now)
            return conn

        def release(conn: HttpConnection) -> None:
            nonlocal open_now
            if new_connection or conn.transport is None:
                conn.close()
                open_now -= 1
            else:
                idle.append(conn)

        async def one(index: int, intended: float) -> None:
            nonlocal errors
            wire = wires[index % len(wires)]
            for attempt in range(2):
                try:
                    conn = await acquire()
                except OSError:
                    errors += 1
                    return
                reused = conn.requests > 0
                try:
                    status = await conn.request(wire)
                except OSError:
                    release(conn)
                    if reused and attempt == 0:
                        continue  # closed by the server as it was reused: retry, as clients do
                    errors += 1
                    return
                release(conn)
                latencies.append(time.perf_counter() - intended)
                errors += status >= 400
                return

        if not new_connection:
            for _ in range(warm_connections):
                idle.append(await acquire())
        tasks = set()
        start = time.perf_counter() + 0.05
        for index in range(total):
            intended = start + index / rate
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, time.perf_counter() - intended))
            task = asyncio.create_task(one(index, intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        for conn in idle:
            conn.close()
        received = sum(c.received for c in made)
        load = LoadResult(len(latencies), elapsed, received, errors, percentiles_ms(latencies))
        return OpenLoopResult(rate, total, load, percentiles_ms(lags), peak)

    result: OpenLoopResult = _asyncio_run(main())
    return result


# --------------------------------------------------------------------------------------
# Measurements


def cpu_summary(runs: Sequence[LoadResult]) -> dict[str, float]:
    """Median CPU microseconds per request (server, load generator), and what they imply:
    the requests/s this machine's cores would sustain if nothing else ran on them."""
    server = statistics.median(r.server_cpu_s / max(r.requests, 1) * 1e6 for r in runs)
    client = statistics.median(r.client_cpu_s / max(r.requests, 1) * 1e6 for r in runs)
    cores = len(os.sched_getaffinity(0))
    return {
        "server_cpu_us_per_request": round(server, 1),
        "client_cpu_us_per_request": round(client, 1),
        "idle_machine_estimate_per_s": round(cores * 1e6 / max(server + client, 1e-9)),
    }


class Meter:
    """The CPU time the server and the load generator (this process, or wrk, its child)
    use from its creation until :meth:`stop`."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._server_cpu = server.cpu_seconds()
        self._times = os.times()

    def stop(self, result: LoadResult) -> LoadResult:
        times = os.times()
        result.server_cpu_s = self._server.cpu_seconds() - self._server_cpu
        result.client_cpu_s = sum(times[:4]) - sum(self._times[:4])
        result.load_average = os.getloadavg()[0]
        return result


@dataclass
class Bench:
    args: argparse.Namespace
    scratch: Path
    client: str
    """"wrk" or "python" (closed loops)."""

    def closed(
        self, server: Server, requests: Sequence[Request], connections: int, seconds: float
    ) -> LoadResult:
        meter = Meter(server)
        if self.client == "wrk":
            result = run_wrk(
                server.url, requests, connections, seconds, self.args.wrk_threads, self.scratch
            )
        else:
            result = python_closed_loop(server.port, requests, connections, seconds)
        return meter.stop(result)

    def repeated(
        self,
        server: Server,
        requests: Sequence[Request],
        connections: int,
        label: str,
        key: Callable[[LoadResult], float] = lambda r: r.rps,
    ) -> dict[str, Any]:
        """Warm up, then ``--repeats`` runs; best and median of ``key``."""
        if self.args.warmup > 0:
            self.closed(server, requests, connections, self.args.warmup)
        runs = [
            self.closed(server, requests, connections, self.args.duration)
            for _ in range(self.args.repeats)
        ]
        values = [key(r) for r in runs]
        best = runs[values.index(max(values))]
        summary = {
            "connections": connections,
            "best": round(max(values), 1),
            "median": round(statistics.median(values), 1),
            "p50_ms_of_best": round(best.latency_ms.get("p50", float("nan")), 3),
            "p99_ms_of_best": round(best.latency_ms.get("p99", float("nan")), 3),
            "errors": sum(r.errors for r in runs),
            **cpu_summary(runs),
            "runs": [r.as_json() for r in runs],
        }
        print(
            f"  {label}: best {summary['best']:,.1f}, median {summary['median']:,.1f} "
            f"({', '.join(f'{v:,.0f}' for v in values)}); errors {summary['errors']}; "
            f"server CPU {summary['server_cpu_us_per_request']:.0f} us/request; "
            f"load average {runs[-1].load_average:.1f}",
            flush=True,
        )
        return summary

    def open_loop(
        self, server: Server, requests: Sequence[Request], new_connection: bool, label: str
    ) -> dict[str, Any]:
        args = self.args
        if args.warmup > 0:
            python_open_loop(server.port, requests, args.rate, args.warmup, new_connection)
        runs = []
        for _ in range(args.repeats):
            meter = Meter(server)
            run = python_open_loop(server.port, requests, args.rate, args.duration, new_connection)
            meter.stop(run.load)
            runs.append(run)
        p50s = [r.load.latency_ms["p50"] for r in runs]
        p99s = [r.load.latency_ms["p99"] for r in runs]
        summary = {
            "offered_per_s": args.rate,
            "p50_ms_median": round(statistics.median(p50s), 3),
            "p99_ms_median": round(statistics.median(p99s), 3),
            "p99_ms_best": round(min(p99s), 3),
            "p99_ms_worst": round(max(p99s), 3),
            "errors": sum(r.load.errors for r in runs),
            "server_cpu_us_per_request": cpu_summary([r.load for r in runs])[
                "server_cpu_us_per_request"
            ],
            "runs": [r.as_json() for r in runs],
        }
        print(
            f"  {label}: p50 {summary['p50_ms_median']:.2f} ms, p99 "
            f"{summary['p99_ms_median']:.2f} ms (median of "
            f"{', '.join(f'{v:.2f}' for v in p99s)}); achieved "
            f"{', '.join(f'{r.load.rps:,.0f}/s' for r in runs)}; errors {summary['errors']}; "
            f"load average {runs[-1].load.load_average:.1f}",
            flush=True,
        )
        return summary


def poll_requests(fleet: Fleet, digests: Sequence[str], etag: str | None = None) -> list[Request]:
    """One request per device; device ``i`` runs ``digests[i % len(digests)]``."""
    return [
        Request(fleet.poll_path(device, digests[i % len(digests)]), credential, etag)
        for i, (device, credential) in enumerate(fleet.devices)
    ]


def measure_database(
    bench: Bench, kind: str, lineage: Lineage, big: Path, log_dir: Path
) -> dict[str, Any]:
    args = bench.args
    result: dict[str, Any] = {}
    with database(kind, args.pg_admin_url) as db, tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        env = server_env(data_dir, db)
        log = log_dir / f"server-{kind}.log"
        subprocess.run(
            [str(VENV_BIN / "diffcast"), "keys", "init"], env=env, cwd=ROOT, check=True,
            capture_output=True,
        )  # fmt: skip
        if args.launcher == "uvicorn" or args.compare_launchers:  # `server run` migrates
            subprocess.run(
                [str(VENV_BIN / "diffcast"), "server", "migrate"], env=env, cwd=ROOT, check=True,
                capture_output=True,
            )  # fmt: skip

        def serve(workers: int, launcher: str = args.launcher) -> Server:
            return Server(launcher, workers, env, log, free_port())

        print(f"[{kind}] setting up: {args.devices:,} devices", flush=True)
        with serve(args.workers) as server:
            fleet = set_up(server.url, lineage, big, args.devices)
            result["setup"] = {
                "devices": len(fleet.devices),
                "versions_before_release": LINEAGE_VERSIONS,
                "big_snapshot_bytes": fleet.big_size,
                **{k: round(v, 2) for k, v in fleet.timings.items()},
            }
            result["server"] = {"command": shown_command(server.command), "workers": args.workers}
            latest = lineage.digests[LINEAGE_VERSIONS - 1]
            current = poll_requests(fleet, [latest])
            # Other configurations, each its own server (this one idles meanwhile).
            if args.sweep_workers:
                sweep = []
                for workers in args.sweep_workers:
                    with serve(workers) as other:
                        summary = bench.repeated(
                            other, current, args.connections, f"polls/s, {workers} worker(s)"
                        )
                    sweep.append({"workers": workers, **summary})
                result["worker_sweep"] = sweep
            if args.compare_launchers:
                launchers = {}
                for launcher in ("cli", "uvicorn"):
                    with serve(args.workers, launcher) as other:
                        launchers[launcher] = {
                            "command": shown_command(other.command),
                            **bench.repeated(
                                other, current, args.connections, f"polls/s via {launcher}"
                            ),
                        }
                result["launchers"] = launchers

            answer = probe(server.url, fleet, latest)
            assert answer.status_code == 200 and answer.json()["status"] == "current", answer.text
            etag = answer.headers["etag"]
            assert probe(server.url, fleet, latest, etag).status_code == 304
            result["poll_current_bytes"] = len(answer.content)

            print(f"[{kind}] up-to-date polls, closed loop ({bench.client})", flush=True)
            result["poll_closed"] = bench.repeated(server, current, args.connections, "200 polls/s")
            result["poll_closed_304"] = bench.repeated(
                server, poll_requests(fleet, [latest], etag), args.connections, "304 polls/s"
            )
            print(f"[{kind}] up-to-date polls, open loop at {args.rate:,.0f}/s", flush=True)
            result["poll_open"] = bench.open_loop(server, current, False, "keep-alive")
            result["poll_open_new_connection"] = bench.open_loop(
                server, current, True, "new connection per poll"
            )

            print(f"[{kind}] release v{LINEAGE_VERSIONS}", flush=True)
            with admin_client(server.url) as client:
                start = time.perf_counter()
                publish_diff(client, lineage, LINEAGE_VERSIONS)
                publish_s = time.perf_counter() - start
            # Other workers see the release within the poll cache period.
            time.sleep(Settings().poll_cache_seconds + 0.5)
            answer = probe(server.url, fleet, latest)
            assert answer.json()["status"] == "update", answer.text
            cold = []
            for number in range(LINEAGE_VERSIONS - 1):  # a composed diff for each
                start = time.perf_counter()
                plan = probe(server.url, fleet, lineage.digests[number]).json()
                cold.append(
                    {
                        "from_version": number,
                        "ms": round((time.perf_counter() - start) * 1e3, 2),
                        "options": [o["kind"] for o in plan["options"]],
                    }
                )
            result["release"] = {
                "publish_s": round(publish_s, 3),
                "plan_bytes_chain": len(answer.content),
                "cold_first_plan": cold,
            }
            print(f"  cold first plans (builds a composed diff): {cold}", flush=True)
            old = lineage.digests[: LINEAGE_VERSIONS - 1]
            result["plan_closed"] = bench.repeated(
                server, poll_requests(fleet, [latest]), args.connections, "plans/s, chain"
            )
            result["plan_closed_mixed"] = bench.repeated(
                server, poll_requests(fleet, old), args.connections, "plans/s, composed (warm)"
            )

            print(f"[{kind}] blob downloads", flush=True)
            blob = [Request(f"/v1/blobs/{fleet.big_sha256}")]
            result["blob"] = bench.repeated(
                server, blob, args.blob_connections, "blob MB/s", key=lambda r: r.mb_s
            )
            log_text = log.read_text(errors="replace")
            result["server_log_errors"] = log_text.count('"level":"error"') + log_text.count(
                "Traceback"
            )
    return result


# --------------------------------------------------------------------------------------
# Reporting


def _version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=10)
    except OSError:
        return "absent"
    return (done.stdout or done.stderr).strip().splitlines()[0]


def shown_command(command: list[str]) -> list[str]:
    """The command as recorded in results: paths inside the repository made relative."""
    return [os.path.relpath(part, ROOT) if part.startswith(str(ROOT)) else part for part in command]


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """The shared machine description, plus the server stack's versions."""
    packages = (
        "fastapi", "starlette", "uvicorn", "uvloop", "httptools", "pydantic", "sqlalchemy",
        "psycopg",
    )  # fmt: skip
    pg_version = None
    if "postgresql" in args.databases:
        import psycopg

        with contextlib.suppress(psycopg.Error), psycopg.connect(args.pg_admin_url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            pg_version = row[0] if row else None
    return {
        **common_machine_info(),
        **{name: metadata.version(name) for name in packages},
        "sqlite": sqlite3.sqlite_version,
        "postgresql": pg_version,
        "wrk": _version(["wrk", "--version"]) if shutil.which("wrk") else "absent",
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "note": "2 cores shared with other engineers' jobs: load average recorded; "
        "each figure repeated (best and median)",
    }


def table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    results = report["databases"]
    machine = report["machine"]
    kinds = list(results)
    out = Table(
        title=f"Diffcast server load: {report['config']['workers']} workers, "
        f"{report['config']['devices']:,} devices; best of {report['config']['repeats']} "
        "runs, median in ()",
        caption=f"{machine['cpu_count']} x {machine['cpu_model']}, shared: load average "
        f"{machine['load_average_before'][0]} before, {machine['load_average_after'][0]} after. "
        "CPU us/request: the server's processes, per answered request (median of runs); "
        "est.: requests/s if the machine's cores ran only the server and the generator.",
    )
    out.add_column("measure")
    for kind in kinds:
        out.add_column(kind, justify="right")
    out.add_column("target (PostgreSQL)", justify="right")

    def row(label: str, cell: Callable[[dict[str, Any]], str], target: str = "") -> None:
        out.add_row(label, *(cell(results[k]) for k in kinds), target)

    def best(key: str, unit: str = "") -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{r[key]['best']:,.0f}{unit} ({r[key]['median']:,.0f})"

    def cpu(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: (
            f"{r[key]['server_cpu_us_per_request']:,.0f} "
            f"({r[key]['idle_machine_estimate_per_s']:,.0f})"
        )

    sweeps = {e["workers"] for r in results.values() for e in r.get("worker_sweep", [])}
    for count in sorted(sweeps):

        def swept(r: dict[str, Any], count: int = count) -> str:
            entry = next((e for e in r.get("worker_sweep", []) if e["workers"] == count), None)
            return f"{entry['best']:,.0f} ({entry['median']:,.0f})" if entry else ""

        row(f"up-to-date polls/s, {count} worker(s)", swept)
    for launcher in ("cli", "uvicorn"):
        if any(launcher in r.get("launchers", {}) for r in results.values()):

            def launched(r: dict[str, Any], launcher: str = launcher) -> str:
                entry = r.get("launchers", {}).get(launcher)
                if entry is None:
                    return ""
                return f"{entry['best']:,.0f} ({entry['server_cpu_us_per_request']:,.0f} us)"

            row(f"up-to-date polls/s via {launcher} (CPU/request)", launched)
    row("up-to-date polls/s (200 current), closed loop", best("poll_closed"), "≥ 2,000")
    row(
        "  latency p50 / p99 ms (best run)",
        lambda r: (
            f"{r['poll_closed']['p50_ms_of_best']:.1f} / {r['poll_closed']['p99_ms_of_best']:.1f}"
        ),
    )
    row("  server CPU us/request (est. on an idle machine /s)", cpu("poll_closed"))
    row("up-to-date polls/s (304, If-None-Match)", best("poll_closed_304"))
    for key, label in (
        ("poll_open", "open loop keep-alive"),
        ("poll_open_new_connection", "open loop new conn./poll"),
    ):
        row(
            f"{label}: p50 / p99 ms",
            lambda r, key=key: f"{r[key]['p50_ms_median']:.2f} / {r[key]['p99_ms_median']:.2f}",
            "p99 < 50" if key == "poll_open" else "",
        )
        row(
            "  p99 range over runs; achieved rate",
            lambda r, key=key: (
                f"{r[key]['p99_ms_best']:.1f}-{r[key]['p99_ms_worst']:.1f}; "
                + "/".join(f"{x['requests_per_s']:,.0f}" for x in r[key]["runs"])
            ),
        )
    row(
        "release: cold first plan ms (v0..v3)",
        lambda r: " ".join(f"{c['ms']:.0f}" for c in r["release"]["cold_first_plan"]),
    )
    row("plans/s, fleet at previous latest (chain)", best("plan_closed"))
    row("  server CPU us/request (est. on an idle machine /s)", cpu("plan_closed"))
    row("plans/s, fleet on older versions (composed)", best("plan_closed_mixed"))
    row("blob download MB/s", best("blob"), "≥ 500")
    Console(width=120).print(out)


def summarize(result: dict[str, Any]) -> None:
    result["targets_met"] = {
        "poll_rps": result["poll_closed"]["best"] >= TARGETS["poll_rps"],
        "open_p99_ms": result["poll_open"]["p99_ms_median"] < TARGETS["open_p99_ms"],
        "blob_mb_s": result["blob"]["best"] >= TARGETS["blob_mb_s"],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    parser.add_argument("--launcher", choices=("cli", "uvicorn"), default="cli")
    parser.add_argument("--compare-launchers", action="store_true")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--sweep-workers", default=None, help="e.g. 1,2,3,4 ('' for none)")
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=float, default=None, help="open-loop polls/s")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=None, help="seconds")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--blob-connections", type=int, default=4)
    parser.add_argument("--big-mb", type=float, default=None)
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "workers": 2,
        "devices": 50 if quick else 1000,
        "rate": 200.0 if quick else 1000.0,
        "duration": 1.0 if quick else 10.0,
        "warmup": 0.0 if quick else 3.0,
        "repeats": 1 if quick else 3,
        "big_mb": 4.0 if quick else 64.0,
        "sweep_workers": "" if quick else "1,2,3,4",
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.databases = [d for d in args.databases.split(",") if d]
    args.sweep_workers = [int(w) for w in str(args.sweep_workers).split(",") if w]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    report: dict[str, Any] = {
        "benchmark": "server_load",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine_info(args),
        "config": {
            "launcher": args.launcher,
            "workers": args.workers,
            "devices": args.devices,
            "connections": args.connections,
            "open_loop_rate": args.rate,
            "seconds_per_run": args.duration,
            "warmup_seconds": args.warmup,
            "repeats": args.repeats,
            "blob_connections": args.blob_connections,
            "wrk_threads": args.wrk_threads,
        },
        "load_generators": {
            "closed_loop": f"wrk -t{args.wrk_threads} + bench/server_load.lua"
            if client == "wrk"
            else "asyncio/uvloop HTTP/1.1 client in bench/server_load.py",
            "open_loop": "asyncio/uvloop HTTP/1.1 client in bench/server_load.py "
            "(latency from the intended send time)",
        },
        "targets": TARGETS,
        "definitions": {
            "poll_closed": "up-to-date polls (digest = latest, no If-None-Match: 200 with "
            "status current), --connections back to back; requests/s",
            "poll_closed_304": "the same with If-None-Match: 304",
            "poll_open": "up-to-date polls at a fixed rate over keep-alive connections; "
            "latency from the intended send time",
            "poll_open_new_connection": "the same, one new TCP connection per poll",
            "plan_closed": "after the release: devices at the previous latest (a one-diff "
            "chain and the full snapshot); requests/s",
            "plan_closed_mixed": "after the release: devices spread over all older versions "
            "(composed diffs, built before: warm); requests/s",
            "blob": "GET of the big snapshot over --blob-connections; MB/s (10^6 bytes)",
            "server_cpu_us_per_request": "CPU time of all server processes / answers",
            "idle_machine_estimate_per_s": "cores x 1e6 / (server + generator CPU us per "
            "request): the rate if nothing else ran on the machine",
        },
        "databases": {},
    }
    with tempfile.TemporaryDirectory(prefix="diffcast-bench-") as tmp:
        scratch = Path(tmp)
        models = scratch / "models"
        models.mkdir()
        lineage = make_lineage(models, LINEAGE_VERSIONS + 1)
        big = make_big_model(models, int(args.big_mb * MB))
        bench = Bench(args, scratch, client)
        for kind in args.databases:
            result = measure_database(bench, kind, lineage, big, scratch)
            summarize(result)
            report["databases"][kind] = result
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    table(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return report


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: stops the server, drops the database


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
