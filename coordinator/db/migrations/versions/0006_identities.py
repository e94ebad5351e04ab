"""Worker identities cost something: give-backs in a row, and who gave a job back.

Revision ID: 0006_identities
Revises: 0005_grant_funded
Create Date: 2026-12-07

Adds `workers.faulted_run` (jobs a worker gave back in a row since it last finished one;
`--faulted-run` of them pause it) and `jobs.gave_back` (the owner account of each worker
that gave the job back, so that one owner cannot fail a job for its requester).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_identities"
down_revision: str | Sequence[str] | None = "0005_grant_funded"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("faulted_run", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("gave_back", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("gave_back")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("faulted_run")
