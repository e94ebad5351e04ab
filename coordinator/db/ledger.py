"""Double-entry kudos ledger: every movement is an entry whose postings sum to zero.

Entries are written inside the caller's transaction, together with the state change that
causes them, and carry an idempotency key so a movement can never happen twice.

Every non-system account has a row in `balances`, updated by `post_entry` in the same
transaction, so reading a balance never scans the ledger. System accounts (escrow, grants,
verification) have none: every job moves them, and one hot row would serialise all writers;
their balance is the sum of their postings. The ledger stays the truth: `audit_balances`
(and the bank test) check that the rows agree with it.

Unspent grants. `balances.grants` is the part of a balance that is not transferable: kudos
the network gave (entries whose reason is in GRANTED: the new-account grant, rating rewards,
uptime, spot-check pay) and pay for jobs that such kudos funded, not yet spent. It is kept
here, by the reason of each entry, so that no path can forget it:
- a GRANTED credit adds to it;
- a "reserve" debit spends it first, and records what it took in `jobs.grant_spent`; it also
  records in `jobs.grant_funded` what of the reservation grants paid, counting what the
  account spent below zero (its floor's credit: the anonymous account's every job) as
  granted too, since nobody earned it;
- a "refund" credit to the job's requester gives back grants first, up to what that job
  still holds in `jobs.grant_spent` (so reserving and cancelling cannot turn a grant into
  earned kudos), and takes the same off `jobs.grant_funded` first;
- the pay for a job (coordinator.economy.payments), and moves out of a worker's pending account
  (releases, forfeits, disputes), say which part of each posting is grants (`granted`):
  what grants funded reaches workers as grants;
- nothing else touches it: transfers may move only what is not grants
  (coordinator.economy.kudos checks that first).
So 0 <= grants <= max(balance, 0) for every account (`audit_grants`), and the kudos that are
transferable can only move, never appear (`transferable_supply`, checked by the audit and
the bank test against what operator actions put in).
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import bindparam, case, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.db import raw
from coordinator.db.schema import accounts, balances, jobs, ledger_entries, postings
from coordinator.db.tx import SYSTEM, TOUCHED, now
from coordinator.errors import Conflict

__all__ = [
    "GRANTED",
    "audit_balances",
    "audit_grants",
    "balance",
    "grants",
    "lock_balance",
    "lock_spender",
    "minted_transferable",
    "open_balance",
    "post_entry",
    "total_supply",
    "transferable_supply",
]

# entries whose credits are granted kudos: spendable on jobs, never transferable. All of
# them are minted by the coordinator without an operator's say, so none may be transferable.
GRANTED = frozenset({"grant", "rating", "uptime", "verify"})
# entries that create transferable kudos: the operator's explicit `--mint`, and "opening",
# what accounts held transferable when this rule began (migration 0005_grant_funded)
MINTED = frozenset({"mint", "opening"})

# built once (coordinator.db.prepared): every job runs these
# (update statements may not name a bind parameter like a column: b_*)
_ACCOUNT = bindparam("account_id", type_=balances.c.account_id.type)
_B_ACCOUNT = bindparam("b_account", type_=balances.c.account_id.type)
_SEEN = select(ledger_entries.c.id).where(ledger_entries.c.idempotency_key == bindparam("key"))
_INSERT_ENTRY = ledger_entries.insert().returning(ledger_entries.c.id)
_INSERT_POSTINGS = postings.insert()
_MOVE = (
    update(balances)
    .where(balances.c.account_id == _B_ACCOUNT)
    .values(amount=balances.c.amount + bindparam("b_amount", type_=balances.c.amount.type))
)
_MOVE_GRANTS = _MOVE.values(
    grants=balances.c.grants + bindparam("b_granted", type_=balances.c.grants.type)
)
_SPENDER = (
    select(balances.c.amount, balances.c.grants)
    .where(balances.c.account_id == _ACCOUNT)
    .with_for_update()
)
# a reservation's grants (update statements may not name a bind parameter like a column)
_SPEND_GRANTS = (
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"))
    .values(
        grant_spent=jobs.c.grant_spent + bindparam("spent", type_=jobs.c.grant_spent.type),
        grant_funded=jobs.c.grant_funded + bindparam("funded", type_=jobs.c.grant_funded.type),
    )
)
_BALANCE = select(balances.c.amount).where(balances.c.account_id == _ACCOUNT)
_GRANTS = select(balances.c.grants).where(balances.c.account_id == _ACCOUNT)
_GRANTS_LOCKED = _GRANTS.with_for_update()
_LOCK_SPENDER = (
    select(accounts.c.id).where(accounts.c.id == _ACCOUNT).with_for_update(key_share=True)
)


async def post_entry(
    conn: AsyncConnection,
    *,
    reason: str,
    key: str,
    moves: list[tuple[int, int]],
    job_id: str | None = None,
    granted: Mapping[int, int] | None = None,
) -> int:
    """Write one entry of (account_id, amount) postings; amounts must sum to zero.

    `granted`: account id -> the part of its amount in this entry that is grants (same sign
    as the amount, no larger), for accounts whose share the reason rules below cannot know
    (a job's pay, moves out of pending accounts); it replaces those rules for them."""
    if sum(amount for _, amount in moves) != 0:
        raise ValueError(f"ledger entry {key!r} does not balance: {moves}")
    if not moves:
        raise ValueError(f"ledger entry {key!r} has no postings")
    if (await raw.execute(conn, _SEEN, {"key": key})).first() is not None:
        raise Conflict(f"ledger entry {key!r} was already written")
    # The unique key is the backstop if two transactions race past the check above.
    entry = {"reason": reason, "job_id": job_id, "idempotency_key": key, "created_at": now(conn)}
    entry_id = (await raw.execute(conn, _INSERT_ENTRY, entry)).scalar_one()
    await raw.execute(
        conn,
        _INSERT_POSTINGS,
        [{"entry_id": entry_id, "account_id": acc, "amount": amount} for acc, amount in moves],
    )
    per_account: dict[int, int] = {}
    for account_id, amount in moves:
        per_account[account_id] = per_account.get(account_id, 0) + amount
    touched: set[int] = conn.info.setdefault(TOUCHED, set())
    system: frozenset[int] = conn.info.get(SYSTEM, frozenset())
    # in account order, so that two entries moving kudos both ways cannot deadlock
    for account_id in sorted(per_account):
        if account_id in system:
            continue
        amount = per_account[account_id]
        if granted is not None and account_id in granted:
            moved = granted[account_id]
            if moved * amount < 0 or abs(moved) > abs(amount):
                raise ValueError(f"ledger entry {key!r}: {moved} granted of {amount}")
        else:
            moved = await _grants_moved(conn, reason, job_id, account_id, amount)
        move = {"b_account": account_id, "b_amount": amount}
        if moved:
            changed = await raw.execute(conn, _MOVE_GRANTS, {**move, "b_granted": moved})
        else:
            changed = await raw.execute(conn, _MOVE, move)
        if changed.rowcount == 0:
            if await _is_system(conn, account_id):
                continue
            # an account created without a row: start it from the ledger
            total = await _ledger_sum(conn, account_id)
            await conn.execute(
                balances.insert().values(
                    account_id=account_id, amount=total, ranked=total, grants=max(moved, 0)
                )
            )
        touched.add(account_id)
    return int(entry_id)


async def _grants_moved(
    conn: AsyncConnection, reason: str, job_id: str | None, account_id: int, amount: int
) -> int:
    """How much the account's unspent grants change with its `amount` in this entry (see
    the module docstring); updates `jobs.grant_spent` for reserves and refunds."""
    if amount > 0 and reason in GRANTED:
        return amount
    if job_id is None:
        return 0
    if amount < 0 and reason == "reserve":
        row = (await raw.execute(conn, _SPENDER, {"account_id": account_id})).first()
        before, unspent = (int(row.amount), int(row.grants)) if row is not None else (0, 0)
        used = min(unspent, -amount)
        # what is neither grants nor below zero was earned or transferred
        own = min(-amount - used, max(before - unspent, 0))
        if used or own != -amount:
            await raw.execute(
                conn,
                _SPEND_GRANTS,
                {"job_id": job_id, "spent": used, "funded": -amount - own},
            )
        return -used
    if amount > 0 and reason == "refund":
        held = (
            await conn.execute(
                select(jobs.c.grant_spent, jobs.c.grant_funded)
                .where((jobs.c.id == job_id) & (jobs.c.account_id == account_id))
                .with_for_update()
            )
        ).first()
        if held is None:
            return 0
        back = min(int(held.grant_spent), amount)
        funded = min(int(held.grant_funded), amount)
        if back or funded:
            await conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(
                    grant_spent=jobs.c.grant_spent - back,
                    grant_funded=jobs.c.grant_funded - funded,
                )
            )
        return back
    return 0


async def grants(conn: AsyncConnection, account_id: int, *, lock: bool = False) -> int:
    """The account's unspent granted kudos (0 for accounts without a balance row)."""
    query = _GRANTS_LOCKED if lock else _GRANTS
    return int((await conn.execute(query, {"account_id": account_id})).scalar_one_or_none() or 0)


async def _is_system(conn: AsyncConnection, account_id: int) -> bool:
    kind = (
        await conn.execute(select(accounts.c.kind).where(accounts.c.id == account_id))
    ).scalar_one()
    return bool(kind == "system")


async def _ledger_sum(conn: AsyncConnection, account_id: int) -> int:
    query = select(func.coalesce(func.sum(postings.c.amount), 0)).where(
        postings.c.account_id == account_id
    )
    return int((await conn.execute(query)).scalar_one())


async def open_balance(conn: AsyncConnection, account_id: int) -> None:
    """Give a new non-system account its balance row (zero)."""
    await conn.execute(balances.insert().values(account_id=account_id, amount=0, ranked=0))


async def balance(conn: AsyncConnection, account_id: int) -> int:
    """The account's balance: its row, or for a system account the sum of its postings."""
    row = (await raw.execute(conn, _BALANCE, {"account_id": account_id})).scalar_one_or_none()
    return int(row) if row is not None else await _ledger_sum(conn, account_id)


async def lock_spender(conn: AsyncConnection, account_id: int) -> None:
    """Serialise spending from one account (PostgreSQL; SQLite serialises all writers):
    every path that checks a balance before spending (submit, transfer, rating) takes this
    lock first, so two spends cannot both pass the check. FOR NO KEY UPDATE on the account
    row: postings' foreign-key checks (FOR KEY SHARE) on it never wait, and the balance rows
    stay free for post_entry to update in account order (no deadlock between opposite
    transfers)."""
    await raw.execute(conn, _LOCK_SPENDER, {"account_id": account_id})


async def lock_balance(conn: AsyncConnection, account_id: int) -> int:
    """The balance, its row locked until the transaction ends: taken before changing an
    account's queued jobs, in the order the rank refresh takes them (balance, then jobs)."""
    row = (
        await conn.execute(
            select(balances.c.amount).where(balances.c.account_id == account_id).with_for_update()
        )
    ).scalar_one_or_none()
    return int(row) if row is not None else await _ledger_sum(conn, account_id)


async def audit_balances(conn: AsyncConnection) -> list[tuple[int, int, int]]:
    """(account id, row, ledger sum) of every balance row that disagrees with the ledger."""
    sums = (
        select(postings.c.account_id, func.sum(postings.c.amount).label("total"))
        .group_by(postings.c.account_id)
        .subquery()
    )
    query = select(
        balances.c.account_id, balances.c.amount, func.coalesce(sums.c.total, 0)
    ).select_from(balances.outerjoin(sums, sums.c.account_id == balances.c.account_id))
    return [
        (int(a), int(row), int(total))
        for a, row, total in (await conn.execute(query)).all()
        if int(row) != int(total)
    ]


async def audit_grants(conn: AsyncConnection) -> list[tuple[int, int, int]]:
    """(account id, balance, unspent grants) of every balance row whose grants are not
    between 0 and its balance (0 when the balance is negative)."""
    positive = case((balances.c.amount > 0, balances.c.amount), else_=0)
    query = select(balances.c.account_id, balances.c.amount, balances.c.grants).where(
        (balances.c.grants < 0) | (balances.c.grants > positive)
    )
    return [(int(a), int(amount), int(g)) for a, amount, g in (await conn.execute(query)).all()]


async def total_supply(conn: AsyncConnection) -> int:
    """Sum of every posting: zero whenever the ledger is consistent."""
    return int(
        (await conn.execute(select(func.coalesce(func.sum(postings.c.amount), 0)))).scalar_one()
    )


async def transferable_supply(conn: AsyncConnection) -> int:
    """All transferable kudos: every balance's part above its unspent grants (nothing of a
    balance below zero), plus what open jobs hold in escrow that grants did not fund."""
    own = case((balances.c.amount > balances.c.grants, balances.c.amount - balances.c.grants))
    held = (
        await conn.execute(select(func.coalesce(func.sum(own), 0)).select_from(balances))
    ).scalar_one()
    escrow = (
        await conn.execute(
            select(func.coalesce(func.sum(jobs.c.grant_funded), 0)).where(
                jobs.c.state.in_(("queued", "leased"))
            )
        )
    ).scalar_one()
    escrow_id = (
        await conn.execute(select(accounts.c.id).where(accounts.c.name == "system:escrow"))
    ).scalar_one_or_none()
    in_escrow = 0 if escrow_id is None else await _ledger_sum(conn, int(escrow_id))
    return int(held) + in_escrow - int(escrow)


async def minted_transferable(conn: AsyncConnection) -> int:
    """All transferable kudos ever created: the credits of MINTED entries."""
    query = (
        select(func.coalesce(func.sum(postings.c.amount), 0))
        .select_from(postings.join(ledger_entries))
        .where(ledger_entries.c.reason.in_(sorted(MINTED)) & (postings.c.amount > 0))
    )
    return int((await conn.execute(query)).scalar_one())
