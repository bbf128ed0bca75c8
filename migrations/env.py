"""Alembic environment: runs migrations against the URL in the Alembic config.

``server.migrate`` sets ``sqlalchemy.url`` from the settings; the ORM metadata (with its
naming convention) is the autogenerate target, so drift between models and migrations
is detectable (a test checks there is none).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

import server.models  # noqa: F401  (registers the tables)
from server.db import Base
from server.settings import Settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    return url or Settings().resolved_database_url()


def run_migrations_offline() -> None:
    context.configure(
        url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    section = config.get_section(config.config_ini_section, {})
    section["sqlalchemy.url"] = _url()
    connectable = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
