"""Grants stay grants: what of a job grants funded, and the transferable kudos so far.

Revision ID: 0005_grant_funded
Revises: 0004_doors
Create Date: 2026-12-07

Adds `jobs.grant_funded`: the part of a job's reservation still in escrow that grants (or
credit below zero) paid; that part of its pay reaches workers as grants. Open jobs get
their `grant_spent`, and all of an anonymous job (the anonymous account spends credit).

From now on transferable kudos are created only by the operator (`--mint`), and the ledger
audit checks that they never exceed what was minted. What accounts hold transferable now
was earned under the old rules and stays theirs: one "opening" entry records it (two
postings on system:grants that cancel, the positive one being the amount), so the audit
counts it as minted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_grant_funded"
down_revision: str | Sequence[str] | None = "0004_doors"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = "state IN ('queued', 'leased')"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("grant_funded", sa.BigInteger(), nullable=False, server_default="0")
        )
    bind = op.get_bind()
    bind.execute(sa.text(f"UPDATE jobs SET grant_funded = grant_spent WHERE {OPEN}"))
    bind.execute(
        sa.text(
            f"UPDATE jobs SET grant_funded = cost WHERE {OPEN} AND account_id IN "
            "(SELECT id FROM accounts WHERE kind = 'anonymous')"
        )
    )
    held = bind.execute(
        sa.text("SELECT COALESCE(SUM(amount - grants), 0) FROM balances WHERE amount > grants")
    ).scalar_one()
    escrow = bind.execute(
        sa.text(
            "SELECT COALESCE(SUM(p.amount), 0) FROM postings p "
            "JOIN accounts a ON a.id = p.account_id WHERE a.name = 'system:escrow'"
        )
    ).scalar_one()
    funded = bind.execute(
        sa.text(f"SELECT COALESCE(SUM(grant_funded), 0) FROM jobs WHERE {OPEN}")
    ).scalar_one()
    opening = int(held) + int(escrow) - int(funded)
    grants = bind.execute(
        sa.text("SELECT id FROM accounts WHERE name = 'system:grants'")
    ).scalar_one_or_none()
    if opening <= 0 or grants is None:
        return
    entry = bind.execute(
        sa.text(
            "INSERT INTO ledger_entries (reason, job_id, idempotency_key, created_at) "
            "VALUES ('opening', NULL, 'opening:0005_grant_funded', :at) RETURNING id"
        ),
        {"at": time.time()},
    ).scalar_one()
    for amount in (-opening, opening):
        bind.execute(
            sa.text("INSERT INTO postings (entry_id, account_id, amount) VALUES (:e, :a, :amount)"),
            {"e": entry, "a": grants, "amount": amount},
        )


def downgrade() -> None:
    bind = op.get_bind()
    bind.execute(
        sa.text(
            "DELETE FROM postings WHERE entry_id IN (SELECT id FROM ledger_entries "
            "WHERE idempotency_key = 'opening:0005_grant_funded')"
        )
    )
    bind.execute(
        sa.text("DELETE FROM ledger_entries WHERE idempotency_key = 'opening:0005_grant_funded'")
    )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("grant_funded")
