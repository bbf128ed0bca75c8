"""The agent's state directory, and crash-safe reads and writes of its small files.

Layout::

    <state>/bundle.json          provisioning: trusted root, enrollment secret (read-only)
    <state>/identity.json        device id and credential (after enrollment)
    <state>/current.json         the live model: model, version, digest, file name
    <state>/previous.json        the model before it (kept for rollback)
    <state>/journal.json         the update in progress, if any
    <state>/refused.json         target digests refused for good (failed health check)
    <state>/models/<hex>.safetensors   model files, named by canonical digest
    <state>/downloads/           blobs, and ``*.incomplete`` partial downloads (resumable)
    <state>/staging/             models being built; never live
    <state>/outbox/              reports not yet delivered
    <state>/reports.jsonl        reports delivered (history)
    <state>/tuf/                 trusted TUF metadata

Every JSON file is replaced atomically (temporary file, fsync, rename): a crash leaves
the old content or the new, never a mix. ``current.json`` is the one switch: a model
is live exactly when ``current.json`` names it, and it is written only after the model
file is complete, verified and durable.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffs.fileio import atomic_output


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def write_json(path: Path, value: Any) -> None:
    with atomic_output(path) as out:
        out.write(json.dumps(value, indent=2, sort_keys=True).encode())


@dataclass(frozen=True)
class InstalledModel:
    model: str
    version: int | None
    digest: str
    file: str
    """File name under ``models/``."""


@dataclass(frozen=True)
class StateDir:
    root: Path

    def __post_init__(self) -> None:
        for sub in ("models", "downloads", "staging", "outbox", "tuf"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def bundle(self) -> Path:
        return self.root / "bundle.json"

    @property
    def identity(self) -> Path:
        return self.root / "identity.json"

    @property
    def sent_log(self) -> Path:
        """Reports delivered to the server, one JSON object a line (the device's history)."""
        return self.root / "reports.jsonl"

    @property
    def journal(self) -> Path:
        return self.root / "journal.json"

    @property
    def refused(self) -> Path:
        return self.root / "refused.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def tuf(self) -> Path:
        return self.root / "tuf"

    def model_file(self, digest: str) -> Path:
        return self.models / f"{digest.removeprefix('sha256:')}.safetensors"

    def installed(self, which: str = "current") -> InstalledModel | None:
        raw = read_json(self.root / f"{which}.json")
        return None if raw is None else InstalledModel(**raw)

    def set_installed(self, model: InstalledModel, which: str = "current") -> None:
        write_json(self.root / f"{which}.json", asdict(model))
