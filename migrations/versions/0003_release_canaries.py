"""release canaries

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("canary_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("canary_max_wer", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("canary_clips", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_releases_canary_sha256_blobs"), "blobs", ["canary_sha256"], ["sha256"]
        )


def downgrade() -> None:
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_releases_canary_sha256_blobs"), type_="foreignkey")
        batch_op.drop_column("canary_clips")
        batch_op.drop_column("canary_max_wer")
        batch_op.drop_column("canary_sha256")
