"""The released schema: schema_version 3 of the hand-written migrations.

Revision ID: 0001_released
Revises:
Create Date: 2026-12-02

Exactly what the release before Alembic left in a database (`git show df61167:
coordinator/schema.py`), so such a database is stamped with this revision instead of
running it. Frozen: never import coordinator.db.schema here, never edit it; change the
schema in a new revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_released"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # the hand-written migrations' bookkeeping, at the version the release left it
    # (0002_sql_queue drops it)
    schema_version = op.create_table(
        "schema_version",
        sa.Column("version", sa.Integer(), primary_key=True),
    )
    op.bulk_insert(schema_version, [{"version": 1}, {"version": 2}, {"version": 3}])

    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("api_key_hash", sa.String(64), unique=True),
        sa.Column("floor", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(36)),
        sa.Column("idempotency_key", sa.String(128), nullable=False, unique=True),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "text_models",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("blocks", sa.Integer(), nullable=False),
        sa.Column("parameters", sa.BigInteger(), nullable=False),
        sa.Column("max_context", sa.Integer(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("trusted", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("suspicion", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("paused", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("pause_reason", sa.Text()),
        sa.Column("checks_passed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("checks_failed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("jobs_done", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("engine", sa.Text()),
        sa.Column("online_since", sa.Float()),
    )
    op.create_table(
        "postings",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("entry_id", sa.Integer(), sa.ForeignKey("ledger_entries.id"), nullable=False),
        sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_postings_account", "postings", ["account_id"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("params_hash", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128)),
        sa.Column("pixels", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("cost", sa.BigInteger(), nullable=False),
        sa.Column("priority_class", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("worker_id", sa.String(36), sa.ForeignKey("workers.id")),
        sa.Column("lease_seconds", sa.Float(), nullable=False),
        sa.Column("lease_deadline", sa.Float()),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("image", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("steps_total", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("finished_at", sa.Float()),
        sa.Column("leased_at", sa.Float()),
        sa.Column("verify_of", sa.String(36)),
        sa.Column("shared", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index("ix_jobs_state", "jobs", ["state", "created_at"])
    op.create_index("ix_jobs_account", "jobs", ["account_id"])
    op.create_table(
        "request_keys",
        sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id"), primary_key=True),
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "worker_peers",
        sa.Column("peer_id", sa.String(128), primary_key=True),
        sa.Column("worker_id", sa.String(36), sa.ForeignKey("workers.id"), nullable=False),
        sa.Column("linked_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "results",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("idx", sa.Integer(), primary_key=True),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("worker_id", sa.String(36), sa.ForeignKey("workers.id"), nullable=False),
        sa.UniqueConstraint("job_id", "idx"),
    )
    op.create_table(
        "text_outputs",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("finish_reason", sa.String(16)),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("spans", sa.Text()),
        sa.Column("charged", sa.BigInteger()),
        sa.Column("signature", sa.String(128)),
    )
    op.create_table(
        "ratings",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("idx", sa.Integer(), primary_key=True),
        sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id"), primary_key=True),
        sa.Column("score", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(36), sa.ForeignKey("workers.id")),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_ratings_worker", "ratings", ["worker_id"])


def downgrade() -> None:
    for table in (
        "ratings",
        "text_outputs",
        "results",
        "worker_peers",
        "request_keys",
        "jobs",
        "postings",
        "workers",
        "text_models",
        "ledger_entries",
        "accounts",
        "schema_version",
    ):
        op.drop_table(table)
