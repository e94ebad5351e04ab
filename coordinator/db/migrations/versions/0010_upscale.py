"""The post-processors an image worker holds (AI Horde's `post_processing`).

Revision ID: 0010_upscale
Revises: 0009_text_logprobs
Create Date: 2026-12-07

Adds `workers.post_processors`: a JSON list of the AI Horde post-processors (GFPGAN,
RealESRGAN_x4plus, ...) the worker held at its last poll; NULL for none.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_upscale"
down_revision: str | Sequence[str] | None = "0009_text_logprobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("post_processors", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("post_processors")
