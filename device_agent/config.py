"""The agent's configuration: one explicit object, handed down (nothing reads the
environment below the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AgentConfig:
    server_url: str
    state_dir: Path
    model: str
    fallback_urls: tuple[str, ...] = ()
    """Other replicas of the same server (they share its database and blobs): when the
    current one cannot be reached, the agent moves on to the next, in turn."""
    poll_interval: float = 30.0
    """Seconds between polls when nothing goes wrong."""
    jitter: float = 0.2
    """Each wait is scaled by a random factor in [1 - jitter, 1 + jitter]."""
    max_backoff: float = 600.0
    """Longest wait after repeated failures (exponential backoff)."""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    download_attempts: int = 5
    """Attempts per download (each resumes where the last stopped)."""
    max_blob_bytes: int = 8 * 1024**3
    """Refuse any single download larger than this, whatever the metadata says."""
    max_plan_bytes: int = 64 * 1024
    """Largest plan body accepted from the server."""
    keep_previous: bool = True
    """Keep the previous model for rollback."""
