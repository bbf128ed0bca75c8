"""Real processes for integration tests: the server under uvicorn on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from server.process import LocalServer, free_port, local_server

__all__ = ["ADMIN_TOKEN", "ENROLL_SECRET", "LiveServer", "free_port", "live_server", "server_env"]

ADMIN_TOKEN = "dct_integration-admin"
ENROLL_SECRET = "integration-enroll"


class LiveServer(LocalServer):
    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60.0
        )


def server_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DIFFCAST_DATA_DIR=str(data_dir),
        DIFFCAST_BOOTSTRAP_TOKEN=ADMIN_TOKEN,
        DIFFCAST_ENROLLMENT_SECRET=ENROLL_SECRET,
        DIFFCAST_MIGRATE_ON_START="true",
        DIFFCAST_POLL_CACHE_SECONDS="0.2",
        **extra,
    )
    return env


@contextmanager
def live_server(data_dir: Path, workers: int = 1, **extra: str) -> Iterator[LiveServer]:
    """Run the server on a free loopback port until the block ends."""
    with local_server(data_dir, server_env(data_dir, **extra), workers) as server:
        yield LiveServer(server.url, server.data_dir, server.process, server.log)
