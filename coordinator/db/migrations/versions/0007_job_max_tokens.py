"""A text job's max_tokens in a column of its own.

Revision ID: 0007_job_max_tokens
Revises: 0006_identities
Create Date: 2026-12-07

Adds `jobs.max_tokens`. Text jobs kept their max_tokens in the image columns `steps` and
`steps_total`; the upgrade moves it to `max_tokens` and sets those to 0, as a new text job
has them (pixels and n are already 0 and 1). The downgrade moves it back.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_job_max_tokens"
down_revision: str | Sequence[str] | None = "0006_identities"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_jobs = sa.table(
    "jobs",
    sa.column("kind", sa.String),
    sa.column("steps", sa.Integer),
    sa.column("steps_total", sa.Integer),
    sa.column("max_tokens", sa.Integer),
)
_TEXT = _jobs.c.kind == "text"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("max_tokens", sa.Integer(), nullable=True))
    op.execute(
        sa.update(_jobs).where(_TEXT).values(max_tokens=_jobs.c.steps, steps=0, steps_total=0)
    )


def downgrade() -> None:
    op.execute(
        sa.update(_jobs)
        .where(_TEXT)
        .values(steps=_jobs.c.max_tokens, steps_total=_jobs.c.max_tokens)
    )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("max_tokens")
