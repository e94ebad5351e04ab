"""The ledger as its users see it (`Ledger`, store.ledger): balances, the audit, minting,
transfers, rating rewards, account summaries, history, quotes.

Every method is one database transaction; every movement is a ledger entry with an
idempotency key (see coordinator.db.ledger).

Granted kudos (the new-account grant, rating rewards, uptime, spot-check pay, and pay for
jobs that grants funded: all farmable with many accounts) are spendable on jobs but never
transferable: a transfer may move at most the balance minus the
account's unspent grants (coordinator.db.ledger keeps them), so a thousand fresh accounts
cannot pool their grants into one.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Row, String, case, func, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.accounts import Account
from coordinator.config import CoordinatorConfig
from coordinator.db import request_keys
from coordinator.db.database import GRANTS, Database
from coordinator.db.ledger import (
    audit_balances,
    audit_grants,
    balance,
    grants,
    lock_spender,
    minted_transferable,
    post_entry,
    transferable_supply,
)
from coordinator.db.schema import (
    accounts,
    jobs,
    ledger_entries,
    postings,
    ratings,
    results,
    workers,
)
from coordinator.db.tx import now
from coordinator.economy.payments import PENDING_PREFIX
from coordinator.errors import BadRequest, Conflict, InsufficientKudos, NotFound
from protocol.messages import (
    AccountInfo,
    HistoryEntry,
    HistoryPage,
    Quote,
    RatingRecorded,
    TransferDone,
)
from protocol.signing import canonical_json, sha256_hex

__all__ = ["Ledger", "transferable"]

EARNING_REASONS = ("settle", "uptime", "rating", "release", "verify")
DAY = 86400.0


def transferable(kudos: int, unspent_grants: int, floor: int) -> int:
    """What a transfer may move: the balance less unspent grants, never below the floor."""
    return max(min(kudos - unspent_grants, kudos - floor), 0)


# --- ratings --------------------------------------------------------------------------


async def _rating_stats(conn: AsyncConnection, job_id: str, index: int) -> tuple[float, int]:
    mean, count = (
        await conn.execute(
            select(func.avg(ratings.c.score), func.count()).where(
                (ratings.c.job_id == job_id) & (ratings.c.idx == index)
            )
        )
    ).one()
    return float(mean or 0.0), int(count)


async def _rating_reward(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    rater: Account,
    job: Row[Any],
    own: bool,
    now: float,
) -> int:
    reward = config.rating_reward
    if reward <= 0:
        return 0
    mine = ledger_entries.c.idempotency_key.like(f"rating:{rater.id}:%")
    today = (
        await conn.execute(
            select(func.count())
            .select_from(ledger_entries)
            .where(
                (ledger_entries.c.reason == "rating")
                & mine
                & (ledger_entries.c.created_at >= now - DAY)
            )
        )
    ).scalar_one()
    if today >= config.rating_rewards_per_day:
        return 0
    if own:
        before = (
            await conn.execute(
                select(func.count())
                .select_from(ledger_entries)
                .where(
                    (ledger_entries.c.reason == "rating")
                    & ledger_entries.c.idempotency_key.like(f"rating:{rater.id}:{job.id}:%")
                )
            )
        ).scalar_one()
        reward = min(reward, int(job.cost) // 2 - int(before) * reward)
    return max(reward, 0)


class Ledger:
    """Balances, the audit, minting, transfers, ratings and account summaries: the ledger
    as its users see it. Part of coordinator.store.Store."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def mint(self, name: str, amount: int) -> int:
        """The operator's explicit action (`idlegrid coordinator --mint USER=KUDOS`): give
        the user `name` `amount` new transferable kudos, the one way they come into being
        (README "Threat model: no kudos from nothing"). Returns the ledger entry's id."""
        if amount <= 0:
            raise ValueError(f"mint {amount} kudos: use a positive amount")
        async with self._db.begin() as conn:
            account_id = (
                await conn.execute(
                    select(accounts.c.id).where(
                        (accounts.c.name == name) & (accounts.c.kind == "user")
                    )
                )
            ).scalar_one_or_none()
            if account_id is None:
                raise ValueError(f"no user {name!r} to mint kudos for; check the name")
            return await post_entry(
                conn,
                reason="mint",
                key=f"mint:{account_id}:{uuid.uuid4()}",
                moves=[(self._db.system_account(GRANTS), -amount), (int(account_id), amount)],
            )

    async def balance(self, account_id: int) -> int:
        async with self._db.begin() as conn:
            return await balance(conn, account_id)

    async def balances(self) -> dict[str, int]:
        """Every account's balance by name, summed from the ledger (audits and tests)."""
        query = (
            select(accounts.c.name, func.coalesce(func.sum(postings.c.amount), 0))
            .select_from(accounts.outerjoin(postings, postings.c.account_id == accounts.c.id))
            .group_by(accounts.c.name)
        )
        async with self._db.begin() as conn:
            return {name: int(total) for name, total in (await conn.execute(query)).all()}

    async def audit(self) -> dict[str, int]:
        """Totals used by tests and operators: every entry must sum to zero, every
        balance row must equal its account's postings, its unspent grants must lie between
        0 and its balance, and the transferable kudos (`transferable`) must not exceed
        what the operator minted (`minted`): `transferable_excess` is 0 when they do not."""
        per_entry = (
            select(postings.c.entry_id, func.sum(postings.c.amount).label("total"))
            .group_by(postings.c.entry_id)
            .subquery()
        )
        async with self._db.begin() as conn:
            unbalanced = (
                await conn.execute(
                    select(func.count()).select_from(per_entry).where(per_entry.c.total != 0)
                )
            ).scalar_one()
            entries = (
                await conn.execute(select(func.count()).select_from(ledger_entries))
            ).scalar_one()
            supply = (
                await conn.execute(select(func.coalesce(func.sum(postings.c.amount), 0)))
            ).scalar_one()
            drift = await audit_balances(conn)
            grants_off = await audit_grants(conn)
            movable = await transferable_supply(conn)
            minted = await minted_transferable(conn)
        return {
            "entries": int(entries),
            "unbalanced_entries": int(unbalanced),
            "sum": int(supply),
            "balance_rows_off": len(drift),
            "grants_off": len(grants_off),
            "transferable": movable,
            "minted": minted,
            "transferable_excess": max(movable - minted, 0),
        }

    async def transfer(
        self, sender: Account, to: str, amount: int, idempotency_key: str
    ) -> TransferDone:
        """Move `amount` kudos from `sender` to the user `to`, exactly once per key.

        A replay with the same key and body returns the first answer without moving kudos;
        the same key with a different body is a Conflict.
        """
        digest = sha256_hex(canonical_json({"to": to, "amount": amount}))
        for _ in range(2):
            try:
                async with self._db.begin() as conn:
                    await lock_spender(conn, sender.id)
                    seen = await request_keys.replayed(
                        conn, sender.id, idempotency_key, digest, "transfer"
                    )
                    if seen is not None:
                        return TransferDone.model_validate_json(seen)
                    receiver = (
                        await conn.execute(
                            select(accounts.c.id).where(
                                (accounts.c.name == to) & (accounts.c.kind == "user")
                            )
                        )
                    ).scalar_one_or_none()
                    if receiver is None:
                        raise NotFound(f"no user {to!r}; check the name", [("to", "no such user")])
                    if receiver == sender.id:
                        raise BadRequest(
                            "cannot transfer to yourself", [("to", "must be another user")]
                        )
                    kudos, unspent = await balance(conn, sender.id), await grants(conn, sender.id)
                    available = transferable(kudos, unspent, sender.floor)
                    if amount > available:
                        raise InsufficientKudos(
                            f"you can transfer at most {available} kudos now: your balance is "
                            f"{kudos}, of which {unspent} are granted kudos (spendable on jobs, "
                            "not transferable)",
                            [("amount", f"must be at most {available}")],
                        )
                    entry = await post_entry(
                        conn,
                        reason="transfer",
                        key=f"transfer:{sender.id}:{idempotency_key}",
                        moves=[(sender.id, -amount), (int(receiver), amount)],
                    )
                    done = TransferDone(
                        id=entry, to=to, amount=amount, idempotency_key=idempotency_key
                    )
                    await request_keys.remember(
                        conn, sender.id, idempotency_key, digest, done.model_dump_json()
                    )
                    return done
            except IntegrityError:
                # A concurrent request with the same key won the race; read its answer.
                continue
        raise Conflict(f"Idempotency-Key {idempotency_key!r} is in use by a concurrent request")

    async def rate_image(
        self, rater: Account, job_id: str, index: int, score: int
    ) -> RatingRecorded:
        """Record `rater`'s score of one image and pay the rating reward, once per image.

        The requester may rate their images; anyone registered may rate a shared job's. The
        reward comes from the grants account: `rating_reward` kudos, at most
        `rating_rewards_per_day` rewarded ratings per rater per rolling day, and for one's own
        job at most half its cost in total (so rating never pays for the job itself).
        """
        async with self._db.begin() as conn:
            at = now(conn)
            await lock_spender(conn, rater.id)
            job = (
                await conn.execute(
                    select(jobs).where(
                        (jobs.c.id == job_id)
                        & (jobs.c.kind == "image")
                        & jobs.c.verify_of.is_(None)
                    )
                )
            ).first()
            own = job is not None and job.account_id == rater.id
            if job is None or not (own or job.shared):
                raise NotFound(f"no job {job_id} visible to this API key")
            image = (
                await conn.execute(
                    select(results.c.worker_id).where(
                        (results.c.job_id == job_id) & (results.c.idx == index)
                    )
                )
            ).first()
            if image is None:
                raise NotFound(
                    f"job {job_id} has no image {index} (yet); indexes count from 0",
                    [("index", f"must be 0..{job.n - 1} of a finished job")],
                )
            already = (
                await conn.execute(
                    select(ratings.c.score).where(
                        (ratings.c.job_id == job_id)
                        & (ratings.c.idx == index)
                        & (ratings.c.account_id == rater.id)
                    )
                )
            ).first()
            if already is not None:
                raise Conflict(
                    f"you already rated image {index} of job {job_id} ({already.score}); "
                    "each image can be rated once"
                )
            await conn.execute(
                ratings.insert().values(
                    job_id=job_id,
                    idx=index,
                    account_id=rater.id,
                    score=score,
                    worker_id=image.worker_id,
                    created_at=at,
                )
            )
            reward = await _rating_reward(conn, self._db.config, rater, job, own, at)
            if reward:
                await post_entry(
                    conn,
                    reason="rating",
                    key=f"rating:{rater.id}:{job_id}:{index}",
                    job_id=job_id,
                    moves=[(self._db.system_account(GRANTS), -reward), (rater.id, reward)],
                )
            mean, count = await _rating_stats(conn, job_id, index)
        return RatingRecorded(
            job_id=job_id, index=index, score=score, kudos_earned=reward, rating=mean, ratings=count
        )

    async def image_ratings(self, job_id: str) -> dict[int, tuple[float, int]]:
        """index -> (mean score, number of ratings) for one job's rated images."""
        query = (
            select(ratings.c.idx, func.avg(ratings.c.score), func.count())
            .where(ratings.c.job_id == job_id)
            .group_by(ratings.c.idx)
        )
        async with self._db.begin() as conn:
            rows = (await conn.execute(query)).all()
        return {int(idx): (float(mean), int(count)) for idx, mean, count in rows}

    async def account_info(self, account: Account) -> AccountInfo:
        """Balance and where it came from / went, all derived from the ledger."""
        mine = postings.c.account_id == account.id
        reason = ledger_entries.c.reason
        amount = postings.c.amount

        def total(condition: Any) -> Any:
            return func.coalesce(func.sum(case((condition, amount), else_=0)), 0)

        query = (
            select(
                func.coalesce(func.sum(amount), 0),
                total(reason.in_(EARNING_REASONS) & (amount > 0)),
                total(reason == "grant"),
                total((reason == "transfer") & (amount > 0)),
                total((reason == "transfer") & (amount < 0)),
                total(reason == "reserve"),
                total(reason == "refund"),
            )
            .select_from(postings.join(ledger_entries))
            .where(mine)
        )
        reserved_q = select(func.coalesce(func.sum(jobs.c.cost), 0)).where(
            (jobs.c.account_id == account.id) & jobs.c.state.in_(("queued", "leased"))
        )
        pending_names = select(literal(PENDING_PREFIX, String) + workers.c.id).where(
            workers.c.account_id == account.id
        )
        pending_q = (
            select(func.coalesce(func.sum(amount), 0))
            .select_from(postings.join(accounts, accounts.c.id == postings.c.account_id))
            .where(accounts.c.name.in_(pending_names))
        )
        async with self._db.begin() as conn:
            kudos, earned, granted, t_in, t_out, reserves, refunds = (
                await conn.execute(query)
            ).one()
            reserved = int((await conn.execute(reserved_q)).scalar_one())
            pending = int((await conn.execute(pending_q)).scalar_one())
            unspent = await grants(conn, account.id)
        spent = -int(reserves) - int(refunds) - reserved
        return AccountInfo(
            name=account.name,
            kudos=int(kudos),
            available=max(int(kudos) - account.floor, 0),
            reserved=reserved,
            earned=int(earned),
            pending=pending,
            spent=max(spent, 0),
            granted=int(granted),
            transferred_in=int(t_in),
            transferred_out=-int(t_out),
            unspent_grants=unspent,
            transferable=0
            if account.anonymous
            else transferable(int(kudos), unspent, account.floor),
        )

    async def history(self, account: Account, limit: int, before: int | None = None) -> HistoryPage:
        """The account's ledger entries, newest first, `limit` at a time."""
        query = (
            select(
                ledger_entries.c.id,
                ledger_entries.c.created_at,
                ledger_entries.c.reason,
                ledger_entries.c.job_id,
                func.sum(postings.c.amount),
            )
            .select_from(postings.join(ledger_entries))
            .where(postings.c.account_id == account.id)
            .group_by(
                ledger_entries.c.id,
                ledger_entries.c.created_at,
                ledger_entries.c.reason,
                ledger_entries.c.job_id,
            )
            .order_by(ledger_entries.c.id.desc())
            .limit(limit + 1)
        )
        if before is not None:
            query = query.where(ledger_entries.c.id < before)
        async with self._db.begin() as conn:
            rows = (await conn.execute(query)).all()[: limit + 1]
            ids = [row[0] for row in rows[:limit]]
            others: dict[int, list[str]] = {entry: [] for entry in ids}
            if ids:
                names = (
                    select(postings.c.entry_id, accounts.c.name)
                    .select_from(postings.join(accounts, accounts.c.id == postings.c.account_id))
                    .where(postings.c.entry_id.in_(ids) & (postings.c.account_id != account.id))
                    .order_by(postings.c.id)
                )
                for entry, name in (await conn.execute(names)).all():
                    others[entry].append(name)
        entries = [
            HistoryEntry(
                id=row[0],
                at=row[1],
                reason=row[2],
                job_id=row[3],
                amount=int(row[4]),
                counterparties=others[row[0]],
            )
            for row in rows[:limit]
        ]
        more = len(rows) > limit
        return HistoryPage(
            entries=entries, next_before=entries[-1].id if more and entries else None
        )

    async def quote(
        self, account: Account, cost: int, place: tuple[int, int, float | None]
    ) -> Quote:
        """What a job costing `cost` would mean for `account`: balance, what it can spend, and
        where it would enter the queue (`place`: queue length, position, ETA; from
        Lifecycle.quote_place). Submits nothing."""
        balance_now = await self.balance(account.id)
        length, position, eta = place
        available = max(balance_now - account.floor, 0)
        return Quote(
            kudos_cost=cost,
            balance=balance_now,
            available=available,
            affordable=cost <= available,
            anonymous=account.anonymous,
            queue_length=length,
            queue_position=position,
            eta_seconds=eta,
        )
