"""The queue in SQL: balance rows, jobs.rank and the indexes the queries use.

Revision ID: 0002_sql_queue
Revises: 0001_released
Create Date: 2026-12-02

Adds `balances` (one row per non-system account, filled with its ledger sum),
`rate_buckets`, `jobs.rank` (queued and leased jobs start ranked by their submit time;
the coordinator re-ranks queued jobs from the balances when it starts), the partial
indexes of the queue, the spot checks, the lease reaper and the ETA throughput,
`ix_jobs_account` on (account_id, state), and indexes on postings.entry_id and
ledger_entries.job_id. It drops the old `schema_version` table: Alembic's
`alembic_version` replaces it (the downgrade puts it back at version 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_sql_queue"
down_revision: str | Sequence[str] | None = "0001_released"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUED = "state = 'queued' AND verify_of IS NULL"
CHECKS = "state = 'queued' AND verify_of IS NOT NULL"
LEASED = "state = 'leased'"
DONE = "state = 'done'"

# (name, columns, WHERE) of the partial indexes on jobs
PARTIAL_INDEXES = [
    ("ix_jobs_queue", ["kind", "rank"], QUEUED),
    ("ix_jobs_owner", ["account_id", "kind", "rank"], QUEUED),
    ("ix_jobs_checks", ["kind", "created_at"], CHECKS),
    ("ix_jobs_leases", ["lease_deadline"], LEASED),
    ("ix_jobs_finished", ["kind", "finished_at"], DONE),
]

# the tables as this revision sees them (never the live coordinator.db.schema)
accounts = sa.table("accounts", sa.column("id", sa.Integer()), sa.column("kind", sa.String()))
postings = sa.table(
    "postings", sa.column("account_id", sa.Integer()), sa.column("amount", sa.BigInteger())
)
jobs = sa.table(
    "jobs",
    sa.column("state", sa.String()),
    sa.column("created_at", sa.Float()),
    sa.column("rank", sa.Float()),
)


def upgrade() -> None:
    balances = op.create_table(
        "balances",
        sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id"), primary_key=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("ranked", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "rate_buckets",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_postings_entry", "postings", ["entry_id"])
    op.create_index("ix_ledger_entries_job_id", "ledger_entries", ["job_id"])
    with op.batch_alter_table("jobs") as batch:
        # SQLite adds a NOT NULL column with a constant default in place (no table copy)
        batch.add_column(sa.Column("rank", sa.Float(), nullable=False, server_default="0"))
        batch.drop_index("ix_jobs_account")
        batch.create_index("ix_jobs_account", ["account_id", "state"])
        for name, columns, where in PARTIAL_INDEXES:
            batch.create_index(
                name, columns, sqlite_where=sa.text(where), postgresql_where=sa.text(where)
            )

    # Every non-system account's balance is the sum of its postings; ranks were computed
    # from none yet, so `ranked` starts equal. System accounts get no row (see ledger.py).
    total = sa.cast(sa.func.coalesce(sa.func.sum(postings.c.amount), 0), sa.BigInteger())
    op.execute(
        balances.insert().from_select(
            ["account_id", "amount", "ranked"],
            sa.select(accounts.c.id, total, total)
            .select_from(accounts.outerjoin(postings, postings.c.account_id == accounts.c.id))
            .where(accounts.c.kind != "system")
            .group_by(accounts.c.id),
        )
    )
    # Jobs in the queue, or leased and maybe back in it later, keep their submit order
    # until the coordinator re-ranks them; finished jobs are never ranked again.
    op.execute(
        jobs.update().where(jobs.c.state.in_(["queued", "leased"])).values(rank=jobs.c.created_at)
    )

    op.drop_table("schema_version")


def downgrade() -> None:
    schema_version = op.create_table(
        "schema_version",
        sa.Column("version", sa.Integer(), primary_key=True),
    )
    op.bulk_insert(schema_version, [{"version": 1}, {"version": 2}, {"version": 3}])
    for name, _, _ in PARTIAL_INDEXES:
        op.drop_index(name, table_name="jobs")
    op.drop_index("ix_jobs_account", table_name="jobs")
    op.create_index("ix_jobs_account", "jobs", ["account_id"])
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("rank")
    op.drop_index("ix_ledger_entries_job_id", table_name="ledger_entries")
    op.drop_index("ix_postings_entry", table_name="postings")
    op.drop_table("rate_buckets")
    op.drop_table("balances")
