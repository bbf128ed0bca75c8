"""Run the server as a child process on loopback, for the demo and the integration tests.

:func:`local_server` starts ``uvicorn server.app:app_from_env`` in its own session on a
free ``127.0.0.1`` port, waits until ``/readyz`` answers, and always stops it (the whole
process group: SIGTERM, then SIGKILL) when the block ends. Its output goes to
``<data_dir>/server.log``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalServer:
    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log: Path


@contextmanager
def local_server(
    data_dir: Path,
    env: Mapping[str, str],
    workers: int = 1,
    ready_timeout: float = 60.0,
) -> Iterator[LocalServer]:
    """The server with ``env`` (``DIFFCAST_*`` settings) until the block ends."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "server.log"
    command = [sys.executable, "-m", "uvicorn", "server.app:app_from_env", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    command += ["--log-level", "warning"]
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            command,
            env=dict(env),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = LocalServer(f"http://127.0.0.1:{port}", data_dir, process, log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
