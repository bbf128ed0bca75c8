"""An app per test on SQLite and on PostgreSQL (a fresh database each), and helpers
that make small models and diffs to publish."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.trust.keys import init_keys
from tests.lineage import Lineage, make_lineage

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
ADMIN_TOKEN = "dct_admin-test-token"
ENROLL_SECRET = "enroll-test-secret"


def _pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    if not _pg_available():
        pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (start it: see .ci/run)")
    name = f"diffcast_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _reset_pg(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Signing keys made once per session (as `diffcast keys init` makes them)."""
    root = tmp_path_factory.mktemp("keys")
    init_keys(root / "online", root / "root", now=datetime.now(UTC))
    return root


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path, keys_dir: Path) -> Settings:
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        _reset_pg(url)
    return Settings(
        data_dir=tmp_path / "data",
        database_url=url,
        keys_dir=keys_dir,
        migrate_on_start=True,
        bootstrap_token=ADMIN_TOKEN,
        enrollment_secret=ENROLL_SECRET,
        max_upload_bytes=4 * 1024 * 1024,
        poll_cache_seconds=0.0,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app) as test_client:
        test_client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        yield test_client
    app.state.context.engine.dispose()


@pytest.fixture(scope="session")
def lineage(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    return make_lineage(tmp_path_factory.mktemp("lineage"), 5)


def publish_lineage(
    client: TestClient, lineage: Lineage, model: str = "asr", upto: int = 4
) -> None:
    assert client.post("/v1/models", json={"name": model}).status_code == 201
    r = client.post(f"/v1/models/{model}/versions", content=lineage.files[0].read_bytes())
    assert r.status_code == 201, r.text
    for number in range(1, upto + 1):
        r = client.post(
            f"/v1/models/{model}/versions",
            params={"parent": number - 1},
            content=lineage.diffs[number - 1],
        )
        assert r.status_code == 201, r.text
