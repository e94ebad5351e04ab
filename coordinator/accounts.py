"""Accounts: users, workers' earnings accounts, the anonymous account; API keys; balances."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, func, select
from sqlalchemy.exc import IntegrityError

from coordinator.db.database import ANONYMOUS, GRANTS, Database, now
from coordinator.db.ledger import audit_balances, balance, open_balance, post_entry
from coordinator.db.schema import accounts, ledger_entries, postings
from coordinator.errors import Conflict

__all__ = ["Account", "Accounts", "hash_secret"]


def hash_secret(secret: str) -> str:
    # API keys and tokens are 256-bit random strings, so a plain hash is enough.
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    kind: str
    floor: int

    @property
    def anonymous(self) -> bool:
        return self.kind == "anonymous"


def _account(row: Row[Any]) -> Account:
    return Account(id=row.id, name=row.name, kind=row.kind, floor=row.floor)


class Accounts(Database):
    async def create_account(self, name: str) -> tuple[Account, str]:
        """A new user account with the configured grant; returns it and its API key."""
        api_key = secrets.token_urlsafe(32)
        grant = self._config.new_account_grant
        try:
            async with self.begin() as conn:
                account_id = (
                    await conn.execute(
                        accounts.insert()
                        .values(
                            name=name,
                            kind="user",
                            api_key_hash=hash_secret(api_key),
                            floor=self._config.account_floor,
                            created_at=now(conn),
                        )
                        .returning(accounts.c.id)
                    )
                ).scalar_one()
                await open_balance(conn, account_id)
                if grant:
                    await post_entry(
                        conn,
                        reason="grant",
                        key=f"grant:new-account:{account_id}",
                        moves=[(self._system[GRANTS], -grant), (account_id, grant)],
                    )
        except IntegrityError:
            raise Conflict(
                f"account name {name!r} is taken; choose another name", [("name", "is taken")]
            ) from None
        return Account(account_id, name, "user", self._config.account_floor), api_key

    async def account_by_key(self, api_key: str) -> Account | None:
        async with self.begin() as conn:
            row = (
                await conn.execute(
                    select(accounts).where(accounts.c.api_key_hash == hash_secret(api_key))
                )
            ).first()
        return _account(row) if row else None

    async def anonymous_account(self) -> Account:
        return Account(
            self._system[ANONYMOUS], ANONYMOUS, "anonymous", self._config.anonymous_floor
        )

    async def balance(self, account_id: int) -> int:
        async with self.begin() as conn:
            return await balance(conn, account_id)

    async def balances(self) -> dict[str, int]:
        """Every account's balance by name, summed from the ledger (audits and tests)."""
        query = (
            select(accounts.c.name, func.coalesce(func.sum(postings.c.amount), 0))
            .select_from(accounts.outerjoin(postings, postings.c.account_id == accounts.c.id))
            .group_by(accounts.c.name)
        )
        async with self.begin() as conn:
            return {name: int(total) for name, total in (await conn.execute(query)).all()}

    async def ledger_audit(self) -> dict[str, int]:
        """Totals used by tests and operators: every entry must sum to zero, and every
        balance row must equal its account's postings."""
        per_entry = (
            select(postings.c.entry_id, func.sum(postings.c.amount).label("total"))
            .group_by(postings.c.entry_id)
            .subquery()
        )
        async with self.begin() as conn:
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
        return {
            "entries": int(entries),
            "unbalanced_entries": int(unbalanced),
            "sum": int(supply),
            "balance_rows_off": len(drift),
        }
