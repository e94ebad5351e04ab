"""What an image worker's last pop offered (AI Horde's `is_possible`).

Revision ID: 0010_worker_offers
Revises: 0009_text_logprobs
Create Date: 2026-12-07

Adds `workers.offer`: JSON coordinator.jobs.possible.Offer (size and step limits, the
source processing it takes) written by its pops; NULL until its next pop.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_worker_offers"
down_revision: str | Sequence[str] | None = "0009_text_logprobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("offer", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("offer")
