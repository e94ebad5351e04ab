"""The coordinator's persistent state as one object holding its parts, each a small class
over the shared database handle (coordinator.db.database.Database: engine, transactions,
clock, configuration):

    accounts     coordinator.accounts.Accounts       accounts, API keys, invite codes
    workers      coordinator.workers.Workers         registration, tokens, polls, records
    ledger       coordinator.economy.kudos.Ledger    balances, audit, mint, transfers, ratings
    image_jobs   coordinator.jobs.image.ImageJobs    image jobs   } on the one lifecycle
    text_jobs    coordinator.jobs.text.TextJobs      text jobs    } (coordinator.jobs.lifecycle)
    network      coordinator.jobs.network.Network    who serves what, queues (a read-only view)

Create with `await Store.open(config)`; tests may pass `clock=`.
"""

from __future__ import annotations

import time

from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.accounts import Account, Accounts, hash_secret
from coordinator.config import CoordinatorConfig
from coordinator.db.database import ANONYMOUS, ESCROW, GRANTS, VERIFICATION, Clock, Database
from coordinator.economy.kudos import Ledger
from coordinator.jobs import queue
from coordinator.jobs.image import ImageJob, ImageJobs, ResultRecord
from coordinator.jobs.lifecycle import Requeued
from coordinator.jobs.network import Network
from coordinator.jobs.text import TextJob, TextJobs
from coordinator.workers import Worker, Workers

__all__ = [
    "ANONYMOUS",
    "ESCROW",
    "GRANTS",
    "VERIFICATION",
    "Account",
    "ImageJob",
    "ResultRecord",
    "Store",
    "TextJob",
    "Worker",
    "hash_secret",
]


class Store:
    """The parts of the coordinator's state, sharing one database handle (`db`)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.accounts = Accounts(db)
        self.workers = Workers(db)
        self.ledger = Ledger(db)
        # one queue order for every kind: both job kinds rank into it
        ranking = queue.Ranking(db)
        self.image_jobs = ImageJobs(db, ranking)
        self.text_jobs = TextJobs(db, ranking)
        self.network = Network(db)
        db.add_commit_hook(self._refresh_ranks)

    @classmethod
    async def open(cls, config: CoordinatorConfig, clock: Clock = time.time) -> Store:
        db = await Database.open(config, clock)
        try:
            store = cls(db)
            await store._rerank()
        except BaseException:
            await db.aclose()
            raise
        return store

    async def aclose(self) -> None:
        await self.db.aclose()

    async def _refresh_ranks(self, conn: AsyncConnection, touched: set[int]) -> None:
        """Before a transaction that changed balances commits: their queued jobs' ranks."""
        if touched:
            await queue.refresh_ranks(conn, self.db.config, touched)

    async def _rerank(self) -> None:
        """At start-up, rank every queued job again (the aging settings may have changed);
        one account per transaction: other coordinators may be serving meanwhile."""
        async with self.db.begin() as conn:
            owners = await queue.queued_owners(conn)
        for account_id, anonymous in owners:
            async with self.db.begin() as conn:
                await queue.rerank_account(conn, self.db.config.aging, account_id, anonymous)

    async def reap_expired(self) -> list[Requeued]:
        """Requeue (or fail) the jobs of every kind whose lease ran out (the reaper's round)."""
        return await self.image_jobs.reap_expired() + await self.text_jobs.reap_expired()
