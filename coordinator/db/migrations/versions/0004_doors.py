"""Other doors: AI Horde workers, the network view, requesters who want signed results.

Revision ID: 0004_doors
Revises: 0003_hostile
Create Date: 2026-12-05

Adds `workers.kind` and `workers.models` (what a worker serves, from its polls),
`workers.protocol` (idlegrid, or horde for AI Horde workers popping through /api/v2),
`jobs.signed_only`, `jobs.held_until` (an AI Horde worker's held pay) with its index
`ix_jobs_held`, and `jobs.horde` (the options of an /api/v2 request).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_doors"
down_revision: str | Sequence[str] | None = "0003_hostile"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HELD = "held_until IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=True))
        batch.add_column(sa.Column("models", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("protocol", sa.String(16), nullable=False, server_default="idlegrid")
        )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("signed_only", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("held_until", sa.Float(), nullable=True))
        batch.add_column(sa.Column("horde", sa.Text(), nullable=True))
        batch.create_index(
            "ix_jobs_held",
            ["held_until"],
            sqlite_where=sa.text(HELD),
            postgresql_where=sa.text(HELD),
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_held")
        batch.drop_column("horde")
        batch.drop_column("held_until")
        batch.drop_column("signed_only")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("protocol")
        batch.drop_column("models")
        batch.drop_column("kind")
