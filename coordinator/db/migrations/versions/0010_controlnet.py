"""The ControlNet types an image worker serves.

Revision ID: 0010_controlnet
Revises: 0009_text_logprobs
Create Date: 2026-12-07

Adds `workers.controls`: JSON [control types, annotators] from the worker's last image
poll (NULL: it serves none), so AI Horde's `is_possible` can say whether an online worker
serves a job's ControlNet type.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_controlnet"
down_revision: str | Sequence[str] | None = "0009_text_logprobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("controls", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("controls")
