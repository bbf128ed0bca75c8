"""Server settings: one pydantic-settings class, read once by the app factory.

Every value can be set by an environment variable ``DIFFCAST_<NAME>`` (or a ``.env``
file); nothing is read at import time. The defaults run the embedded configuration:
SQLite and a local content-addressed blob directory under ``data_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFFCAST_", env_file=".env", extra="ignore")

    data_dir: Path = Path("var")
    """Where the embedded database, blobs and keys live by default."""
    database_url: str | None = None
    """SQLAlchemy URL; default ``sqlite:///<data_dir>/diffcast.db``."""
    blob_store: Literal["local", "s3"] = "local"
    blob_dir: Path | None = None
    """Local blob directory; default ``<data_dir>/blobs``."""
    s3_endpoint: str | None = None
    s3_bucket: str = "diffcast"
    s3_region: str = "us-east-1"
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    keys_dir: Path | None = None
    """Online signing keys (made by ``diffcast keys init``); default ``<data_dir>/keys``."""
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    """Largest model or diff upload accepted."""
    migrate_on_start: bool = False
    """Run the Alembic migrations when the app starts."""
    bootstrap_token: str | None = None
    """If set, an admin token with this value exists (for first start and tests)."""
    enrollment_secret: str | None = None
    """The secret devices present to enroll (part of the provisioning bundle)."""
    poll_cache_seconds: float = Field(default=2.0, ge=0)
    """How long a worker reuses its view of the latest version per model."""
    metadata_expiry_days: int = Field(default=7, gt=0)
    """Lifetime of targets and snapshot metadata; timestamp lives one day."""

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'diffcast.db').resolve()}"

    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    def resolved_keys_dir(self) -> Path:
        return self.keys_dir or self.data_dir / "keys"
