"""Database tables (SQLAlchemy Core), and `migrate`, which brings a database to them.

One code path for SQLite and PostgreSQL. Kudos are integers. The ledger's postings are
the truth about balances; `balances` keeps their sums at hand (coordinator.db.ledger).

The tables here are the newest schema; the Alembic revisions in coordinator.db.migrations
build it step by step. Change a table here, then add a revision
(`python -m coordinator.db.migrations revision -m "..." --autogenerate`, and review it):
tests/coordinator/db/test_migrations.py fails while the two disagree.
"""

from __future__ import annotations

import asyncio
import weakref

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.db import migrations

__all__ = ["ACCOUNT_KINDS", "metadata", "migrate"]

metadata = MetaData()

# people with an API key, registered workers, the shared anonymous account, a worker's
# earnings held until it passes a spot check (coordinator.economy.checks), and the ledger's
# own accounts (grants, escrow, verification)
ACCOUNT_KINDS = ("user", "worker", "anonymous", "pending", "system")

accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    # one of ACCOUNT_KINDS
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
    Column("job_id", String(36), index=True),
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
    Index("ix_postings_entry", "entry_id"),
)

balances = Table(
    "balances",
    metadata,
    # the sum of the account's postings, updated in the transaction that posts them
    # (coordinator.db.ledger); the ledger stays the truth and the bank test compares them.
    # System accounts (escrow, grants, ...) have no row: every job moves their balance, and
    # one hot row would serialise all writers on PostgreSQL; their balance is a ledger sum.
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    Column("amount", BigInteger, nullable=False),
    # the balance the ranks of the account's queued jobs were computed from (see
    # coordinator.jobs.queue: ranks are refreshed when the balance moves materially)
    Column("ranked", BigInteger, nullable=False),
    # the part of `amount` that is granted kudos not yet spent: spendable on jobs, never
    # transferable (jobs spend it first; see coordinator.economy.kudos)
    Column("grants", BigInteger, nullable=False, server_default="0"),
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
    # --- trust (schema version 3; see coordinator.economy.checks) ---
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
    # the client IP it registered or last polled from (spot checks avoid the same IP)
    Column("ip", String(64)),
    # --- other doors (0004_doors) ---
    # what it serves, as seen from its polls: image | text | blocks (None: never polled)
    Column("kind", String(16)),
    # JSON list of the models it offered at its last poll
    Column("models", Text),
    # idlegrid: signs its results with its Ed25519 key; horde: an AI Horde worker popping
    # through /api/v2 (unsigned, never trusted, never spot-checked, its pay held)
    Column("protocol", String(16), nullable=False, server_default="idlegrid"),
    # --- identities (0006_identities) ---
    # jobs it gave back in a row since its last finished job (`faulted_run` pauses it)
    Column("faulted_run", Integer, nullable=False, server_default="0"),
    # --- offers (0010_worker_offers) ---
    # JSON coordinator.jobs.possible.Offer of its last image pop: size and step limits and
    # the source processing it takes (AI Horde's `is_possible`); None: not told yet
    Column("offer", Text),
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
    # capability filters copied out of params (an image job's size; 0 for text jobs)
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
    # --- the queue in SQL ---
    # effective time (protocol.priority): submit time minus the requester's kudos head
    # start, or plus the anonymous handicap; the queue runs in rank order
    Column("rank", Float, nullable=False, server_default="0"),
    # --- an open network (0003_hostile) ---
    # granted kudos the reservation used; a refund gives them back as grants first
    Column("grant_spent", BigInteger, nullable=False, server_default="0"),
    # a finished spot check's finding about the original: agree | disagree
    Column("verdict", String(16)),
    # the requester's client IP, on anonymous jobs (bounds what one address holds reserved)
    Column("client_ip", String(64)),
    # --- other doors (0004_doors) ---
    # 1 = only workers that sign their results may run it (no AI Horde workers)
    Column("signed_only", Integer, nullable=False, server_default="0"),
    # an AI Horde worker's pay for it is held until then, unless the requester disputes
    Column("held_until", Float),
    # JSON of /api/v2 request options (r2, ...), None for other doors
    Column("horde", Text),
    # --- grants stay grants (0005_grant_funded) ---
    # what of the reservation still in escrow grants paid (grant_spent, plus what the
    # requester spent below zero); that part of the pay reaches workers as grants
    Column("grant_funded", BigInteger, nullable=False, server_default="0"),
    # --- identities (0006_identities) ---
    # "[account id]" of the owner of each worker that gave it back (or let its lease run
    # out), in order: an owner that gave it back twice is not offered it again
    Column("gave_back", Text, nullable=False, server_default=""),
    # --- text jobs' own column (0007_job_max_tokens) ---
    # a text job's max_tokens (None for image jobs, whose pixels/steps/n say their size)
    Column("max_tokens", Integer),
    # --- LoRAs (0011_lora_pins) ---
    # JSON list of protocol.loras.ResolvedAdapter: the versions and files an image job's
    # result used (signed by its worker); its verification re-run is pinned to them
    Column("adapters", Text),
    # --- refiners (0012_check_refiner) ---
    # on a spot check: the refiner setup (protocol.refiner.refiner_setup) its checker must
    # have to make the original's pixels; NULL: any checker
    Column("check_refiner", Text),
    Index("ix_jobs_state", "state", "created_at"),
    Index("ix_jobs_account", "account_id", "state"),
    # the queue: the next job of a kind is the first row of this index that fits
    Index(
        "ix_jobs_queue",
        "kind",
        "rank",
        sqlite_where=text("state = 'queued' AND verify_of IS NULL"),
        postgresql_where=text("state = 'queued' AND verify_of IS NULL"),
    ),
    # a worker's owner's own queued jobs, best first (without it SQLite walks ix_jobs_queue
    # through every queued job looking for the owner's)
    Index(
        "ix_jobs_owner",
        "account_id",
        "kind",
        "rank",
        sqlite_where=text("state = 'queued' AND verify_of IS NULL"),
        postgresql_where=text("state = 'queued' AND verify_of IS NULL"),
    ),
    # pending spot checks, oldest first
    Index(
        "ix_jobs_checks",
        # kind first: with an equality term of its own, SQLite prefers this small index to
        # ix_jobs_state (which would scan every queued job)
        "kind",
        "created_at",
        sqlite_where=text("state = 'queued' AND verify_of IS NOT NULL"),
        postgresql_where=text("state = 'queued' AND verify_of IS NOT NULL"),
    ),
    # the checks of one job (quorum, independence of verifiers; coordinator.economy.checks)
    Index(
        "ix_jobs_verify_of",
        "verify_of",
        sqlite_where=text("verify_of IS NOT NULL"),
        postgresql_where=text("verify_of IS NOT NULL"),
    ),
    # the lease reaper
    Index(
        "ix_jobs_leases",
        "lease_deadline",
        sqlite_where=text("state = 'leased'"),
        postgresql_where=text("state = 'leased'"),
    ),
    # AI Horde workers' held pay, due for release
    Index(
        "ix_jobs_held",
        "held_until",
        sqlite_where=text("held_until IS NOT NULL"),
        postgresql_where=text("held_until IS NOT NULL"),
    ),
    # throughput for ETAs
    Index(
        "ix_jobs_finished",
        "kind",
        "finished_at",
        sqlite_where=text("state = 'done'"),
        postgresql_where=text("state = 'done'"),
    ),
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
    # JSON list of protocol.text.TokenLogprob, for jobs that asked for logprobs
    Column("logprobs", Text),
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

rate_buckets = Table(
    "rate_buckets",
    metadata,
    # token buckets shared by every coordinator process on one PostgreSQL
    # (coordinator.http.ratelimit); a single SQLite process keeps them in memory
    Column("key", String(200), primary_key=True),
    Column("tokens", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

nonces = Table(
    "nonces",
    metadata,
    # single-use challenges the coordinator hands out (signed worker registration, block
    # server peer-id proofs); a used or expired one is refused
    Column("nonce", String(64), primary_key=True),
    Column("purpose", String(32), nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_nonces_expires", "expires_at"),
)

invites = Table(
    "invites",
    metadata,
    # `--registration invite`: a code (stored hashed) registers one account
    Column("code_hash", String(64), primary_key=True),
    # who made it (None: the operator, from the command line)
    Column("account_id", Integer, ForeignKey("accounts.id")),
    Column("created_at", Float, nullable=False),
    Column("used_by", Integer, ForeignKey("accounts.id")),
    Column("used_at", Float),
)


stored_files = Table(
    "stored_files",
    metadata,
    # `--file-store database` (coordinator.files.database): result images and upload
    # markers, named like paths under the data directory, in chunks of at most 512 KiB
    Column("name", String(200), primary_key=True),
    Column("chunk", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)

coordinator_secrets = Table(
    "coordinator_secrets",
    metadata,
    # random keys every coordinator process on one database shares, kept across restarts
    # (coordinator.db.secrets); never sent to anyone
    Column("name", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)


async def migrate(conn: AsyncConnection) -> str | None:
    """Upgrade the database to the newest Alembic revision inside the caller's
    transaction (which commits it); returns that revision.

    An empty database runs every revision. One left by the release before Alembic (a
    `schema_version` table at version 3; 0002_sql_queue drops that table) is stamped
    0001_released and upgraded from there; an older one is refused, naming the release
    to run first. On PostgreSQL an advisory lock makes coordinators that start together
    migrate one after the other.
    """
    # Alembic keeps its running migration in module globals (alembic.op, alembic.context),
    # so two migrations must not interleave in one process either.
    lock = _MIGRATING.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    async with lock:
        return await conn.run_sync(migrations.upgrade)


_MIGRATING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)
