"""Stored files in the database, for coordinators on several machines.

Revision ID: 0008_stored_files
Revises: 0007_job_max_tokens
Create Date: 2026-12-07

Adds `stored_files`: result images and upload markers as rows of chunks, used with
`--file-store database` (coordinator.files.database). With the default `--file-store
local` the table stays empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_stored_files"
down_revision: str | Sequence[str] | None = "0007_job_max_tokens"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stored_files",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", "chunk"),
    )
    if op.get_bind().dialect.name == "postgresql":
        # PNGs are compressed already: store chunks out of line without trying again
        op.execute("ALTER TABLE stored_files ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_table("stored_files")
