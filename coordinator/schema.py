"""Database tables (SQLAlchemy Core) and the migrations that create them.

One code path for SQLite and PostgreSQL. Kudos are integers. Balances are never
stored: they are the sum of an account's postings.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
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
    # --- trust (schema version 3; see coordinator.trust) ---
    # 1 = its results are believed without holding its earnings
    Column("trusted", Integer, nullable=False, server_default="0"),
    # failed spot checks and impossible speeds; enough of them pause the worker
    Column("suspicion", Integer, nullable=False, server_default="0"),
    Column("paused", Integer, nullable=False, server_default="0"),
    Column("pause_reason", Text),
    Column("checks_passed", Integer, nullable=False, server_default="0"),
    Column("checks_failed", Integer, nullable=False, server_default="0"),
    Column("jobs_done", Integer, nullable=False, server_default="0"),
    # JSON EngineInfo the worker reported after registering
    Column("engine", Text),
    # start of the current stretch of uninterrupted polling (uptime kudos)
    Column("online_since", Float),
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
    # --- schema version 3 ---
    # when the current lease began (speed checks, ETA throughput)
    Column("leased_at", Float),
    # a spot check re-runs the job with this id on a trusted worker
    Column("verify_of", String(36)),
    # 1 = any registered user may see and rate its images
    Column("shared", Integer, nullable=False, server_default="0"),
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


# --- text (LLM) jobs: schema version 2 --------------------------------------------------

worker_peers = Table(
    "worker_peers",
    metadata,
    # a block server's hivemind peer id, linked (signed) to its worker identity
    Column("peer_id", String(128), primary_key=True),
    Column("worker_id", String(36), ForeignKey("workers.id"), nullable=False),
    Column("linked_at", Float, nullable=False),
)

text_models = Table(
    "text_models",
    metadata,
    # models that gateways offered when popping; GET /v1/models lists the recent ones
    Column("name", String(128), primary_key=True),
    Column("blocks", Integer, nullable=False),
    Column("parameters", BigInteger, nullable=False),
    Column("max_context", Integer, nullable=False),
    Column("last_seen", Float, nullable=False),
)

text_outputs = Table(
    "text_outputs",
    metadata,
    # one row per text job once a gateway leased it: the text streamed so far, then the result
    Column("job_id", String(36), ForeignKey("jobs.id"), primary_key=True),
    Column("model", String(128), nullable=False),
    Column("text", Text, nullable=False, default=""),
    Column("finish_reason", String(16)),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    # JSON list of {peer_id, start, end, tokens} as signed by the gateway
    Column("spans", Text),
    Column("charged", BigInteger),
    Column("signature", String(128)),
)


# --- the kudos economy: schema version 3 ----------------------------------------------

ratings = Table(
    "ratings",
    metadata,
    # one score per image per rater
    Column("job_id", String(36), ForeignKey("jobs.id"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    Column("score", Integer, nullable=False),
    # the worker that made the image, for per-worker aggregates
    Column("worker_id", String(36), ForeignKey("workers.id")),
    Column("created_at", Float, nullable=False),
    Index("ix_ratings_worker", "worker_id"),
)

request_keys = Table(
    "request_keys",
    metadata,
    # Idempotency-Key of a money-moving request: a replay gets the stored answer
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("response", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

V3_COLUMNS = {
    "workers": [
        "trusted",
        "suspicion",
        "paused",
        "pause_reason",
        "checks_passed",
        "checks_failed",
        "jobs_done",
        "engine",
        "online_since",
    ],
    "jobs": ["leased_at", "verify_of", "shared"],
}


async def _v1(conn: AsyncConnection) -> None:
    await conn.run_sync(metadata.create_all)


async def _v2(conn: AsyncConnection) -> None:
    # A fresh database got these from _v1's create_all; an older one gets them here.
    await conn.run_sync(
        lambda sync: metadata.create_all(
            sync, tables=[worker_peers, text_models, text_outputs], checkfirst=True
        )
    )


def _add_missing_columns(sync: Connection, table: Table, names: list[str]) -> None:
    present = {column["name"] for column in inspect(sync).get_columns(table.name)}
    for name in names:
        if name in present:
            continue
        column = table.c[name]
        ddl = f"ALTER TABLE {table.name} ADD COLUMN {name} {column.type.compile(sync.dialect)}"
        if column.server_default is not None:
            default = column.server_default.arg  # type: ignore[attr-defined]
            ddl += f" DEFAULT {default}"
        if not column.nullable:
            ddl += " NOT NULL"
        sync.exec_driver_sql(ddl)


def _v3_sync(sync: Connection) -> None:
    # A fresh database got all of this from _v1's create_all; an older one gets it here.
    for table in (workers, jobs):
        _add_missing_columns(sync, table, V3_COLUMNS[table.name])
    metadata.create_all(sync, tables=[ratings, request_keys], checkfirst=True)


async def _v3(conn: AsyncConnection) -> None:
    await conn.run_sync(_v3_sync)


# version -> step; append only, never edit a released step
MIGRATIONS: list[tuple[int, Callable[[AsyncConnection], Awaitable[None]]]] = [
    (1, _v1),
    (2, _v2),
    (3, _v3),
]
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
