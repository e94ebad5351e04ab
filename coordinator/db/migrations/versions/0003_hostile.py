"""An open network: unspent grants, spot-check verdicts, worker IPs, nonces, invites.

Revision ID: 0003_hostile
Revises: 0002_sql_queue
Create Date: 2026-12-04

Adds `balances.grants` (granted kudos not yet spent; existing accounts start at 0, so what
they hold stays transferable), `jobs.grant_spent`, `jobs.verdict`, `jobs.client_ip`,
`workers.ip`, the index `ix_jobs_verify_of` (a job's spot checks), and the `nonces` and
`invites` tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_hostile"
down_revision: str | Sequence[str] | None = "0002_sql_queue"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("balances") as batch:
        batch.add_column(sa.Column("grants", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("grant_spent", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("verdict", sa.String(16), nullable=True))
        batch.add_column(sa.Column("client_ip", sa.String(64), nullable=True))
        batch.create_index(
            "ix_jobs_verify_of",
            ["verify_of"],
            sqlite_where=sa.text("verify_of IS NOT NULL"),
            postgresql_where=sa.text("verify_of IS NOT NULL"),
        )
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("ip", sa.String(64), nullable=True))
    op.create_table(
        "nonces",
        sa.Column("nonce", sa.String(64), primary_key=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_nonces_expires", "nonces", ["expires_at"])
    op.create_table(
        "invites",
        sa.Column("code_hash", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id"), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("used_by", sa.Integer(), sa.ForeignKey("accounts.id"), nullable=True),
        sa.Column("used_at", sa.Float(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("invites")
    op.drop_index("ix_nonces_expires", table_name="nonces")
    op.drop_table("nonces")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("ip")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_verify_of")
        batch.drop_column("client_ip")
        batch.drop_column("verdict")
        batch.drop_column("grant_spent")
    with op.batch_alter_table("balances") as batch:
        batch.drop_column("grants")
