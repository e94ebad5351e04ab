"""Keys shared by every coordinator process on one database.

Revision ID: 0013_coordinator_secrets
Revises: 0012_check_refiner
Create Date: 2026-12-07

Adds `coordinator_secrets`: a random key per name (coordinator.db.secrets), made by the first
process that needs it, e.g. the key of the requester tags text workers keep conversations
under, so that with --processes N, another host or after a restart the same account's next
turn gets the same tag.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_coordinator_secrets"
down_revision: str | Sequence[str] | None = "0012_check_refiner"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "coordinator_secrets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("coordinator_secrets")
