"""Alembic owns the schema: upgrade and downgrade on SQLite and PostgreSQL, and the ORM
models match the migrations (no autogenerate drift)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from server.db import Base
from server.migrate import downgrade, upgrade
from tests.server.api.conftest import _reset_pg


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    url: str = request.getfixturevalue("pg_url")
    _reset_pg(url)
    return url


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    upgrade(db_url)
    engine = create_engine(db_url)
    assert {"models", "versions", "blobs", "devices", "tuf_metadata"} <= set(
        inspect(engine).get_table_names()
    )
    downgrade(db_url, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(db_url)
    engine.dispose()


def test_models_match_migrations(db_url: str) -> None:
    upgrade(db_url)
    engine = create_engine(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        drift = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert drift == []


def test_0003_adds_release_canaries_and_keeps_the_rows(db_url: str) -> None:
    """Releases and their assignments survive 0003 both ways (SQLite rebuilds the table)."""
    upgrade(db_url, "0002")
    engine = create_engine(db_url)
    rows = [
        "INSERT INTO blobs (sha256, size, kind) VALUES ('" + "a" * 64 + "', 10, 'snapshot')",
        "INSERT INTO models (name, description) VALUES ('asr', '')",
        "INSERT INTO versions (model_id, number, digest, snapshot_sha256, notes, method, "
        "metrics, retired) VALUES (1, 0, 'sha256:" + "b" * 64 + "', '" + "a" * 64 + "', '', "
        "'', '{}', false)",
        "INSERT INTO devices (id, credential_hash, tags) VALUES ('d1', '" + "c" * 64 + "', '{}')",
        "INSERT INTO releases (model_id, version_id, name, state, selector, percent, rollback, "
        "failure_threshold, min_attempts, created_by) VALUES (1, 1, 'r', 'active', '{}', 100, "
        "false, 0.2, 5, 'test')",
        "INSERT INTO release_assignments (release_id, device_id, status, bytes_downloaded) "
        "VALUES (1, 'd1', 'applied', 7)",
    ]
    with engine.begin() as conn:
        for row in rows:
            conn.execute(text(row))
    upgrade(db_url, "0003")
    columns = {c["name"] for c in inspect(engine).get_columns("releases")}
    assert {"canary_sha256", "canary_max_wer", "canary_clips"} <= columns
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE releases SET canary_sha256 = :sha, canary_max_wer = 0.3, canary_clips = 2"
            ),
            {"sha": "a" * 64},
        )
        assert conn.execute(text("SELECT count(*) FROM release_assignments")).scalar() == 1
    downgrade(db_url, "0002")
    columns = {c["name"] for c in inspect(engine).get_columns("releases")}
    assert not {"canary_sha256", "canary_max_wer", "canary_clips"} & columns
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name, state FROM releases")).all() == [("r", "active")]
        assert conn.execute(text("SELECT bytes_downloaded FROM release_assignments")).all() == [
            (7,)
        ]
    engine.dispose()
