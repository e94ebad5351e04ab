"""Text results' token log-probabilities (OpenAI's `logprobs`).

Revision ID: 0009_text_logprobs
Revises: 0008_stored_files
Create Date: 2026-12-07

Adds `text_outputs.logprobs`: a JSON list of protocol.text.TokenLogprob, kept for jobs
that asked for logprobs (NULL otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_text_logprobs"
down_revision: str | Sequence[str] | None = "0008_stored_files"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("text_outputs") as batch:
        batch.add_column(sa.Column("logprobs", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("text_outputs") as batch:
        batch.drop_column("logprobs")
