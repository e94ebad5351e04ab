"""Database tables (SQLAlchemy Core) and the migrations that create them.

One code path for SQLite and PostgreSQL. Kudos are integers. Balances are never
stored: they are the sum of an account's postings.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["SCHEMA_VERSION", "metadata", "migrate"]

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    # user | worker | anonymous | system
    Column("kind", String(16), nullable=False),
    Column("api_key_hash", String(64), unique=True),
    # lowest balance spending may reach
    Column("floor", BigInteger, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # grant | reserve | settle | refund
    Column("reason", String(32), nullable=False),
    Column("job_id", String(36)),
    # makes every movement happen at most once
    Column("idempotency_key", String(128), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
)

postings = Table(
    "postings",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("entry_id", Integer, ForeignKey("ledger_entries.id"), nullable=False),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Index("ix_postings_account", "account_id"),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("public_key", String(64), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    # whose balance the worker's earnings go to
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    # queued | leased | done | failed | cancelled
    Column("state", String(16), nullable=False),
    Column("params", Text, nullable=False),
    Column("params_hash", String(64), nullable=False),
    # capability filters copied out of params
    Column("model", String(128)),
    Column("pixels", Integer, nullable=False),
    Column("steps", Integer, nullable=False),
    Column("n", Integer, nullable=False),
    Column("cost", BigInteger, nullable=False),
    # lowest-priority class first to last: 0 = anonymous, 1 = registered
    Column("priority_class", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("worker_id", String(36), ForeignKey("workers.id")),
    Column("lease_seconds", Float, nullable=False),
    Column("lease_deadline", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("image", Integer, nullable=False, default=0),
    Column("step", Integer, nullable=False, default=0),
    Column("steps_total", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("finished_at", Float),
    Index("ix_jobs_state", "state", "created_at"),
    Index("ix_jobs_account", "account_id"),
)

results = Table(
    "results",
    metadata,
    Column("job_id", String(36), ForeignKey("jobs.id"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("seed", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("signature", String(128), nullable=False),
    Column("worker_id", String(36), ForeignKey("workers.id"), nullable=False),
    UniqueConstraint("job_id", "idx"),
)


async def _v1(conn: AsyncConnection) -> None:
    await conn.run_sync(metadata.create_all)


# version -> step; append only, never edit a released step
MIGRATIONS: list[tuple[int, Callable[[AsyncConnection], Awaitable[None]]]] = [(1, _v1)]
SCHEMA_VERSION = MIGRATIONS[-1][0]


async def migrate(conn: AsyncConnection) -> int:
    """Bring the schema to SCHEMA_VERSION inside the caller's transaction."""
    await conn.run_sync(lambda sync: schema_version.create(sync, checkfirst=True))
    current = (await conn.execute(select(schema_version.c.version))).scalars().all()
    version = max(current, default=0)
    for number, step in MIGRATIONS:
        if number > version:
            await step(conn)
            await conn.execute(schema_version.insert().values(version=number))
            version = number
    return version
