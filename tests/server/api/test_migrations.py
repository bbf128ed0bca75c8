"""Alembic owns the schema: upgrade and downgrade on SQLite and PostgreSQL, and the ORM
models match the migrations (no autogenerate drift)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

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
