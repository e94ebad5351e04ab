"""Accounts: users, workers' earnings accounts, the anonymous account; API keys;
registration (`CoordinatorConfig.registration`: open, invite or closed) and invite codes."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.db.database import ANONYMOUS, GRANTS, Database, now
from coordinator.db.ledger import (
    lock_spender,
    open_balance,
    post_entry,
)
from coordinator.db.schema import accounts, invites, workers
from coordinator.errors import Conflict, Forbidden

REGISTRATION_MODES = ("open", "invite", "closed")

__all__ = ["REGISTRATION_MODES", "Account", "Accounts", "hash_secret"]

# built once (coordinator.db.prepared): every request with an API key runs it
_BY_KEY = select(accounts).where(accounts.c.api_key_hash == bindparam("key_hash"))


def new_api_key() -> str:
    """22 characters (128 bits), the length AI Horde's clients accept for a key, never
    starting with "-" (which a command line would take for an option)."""
    while True:
        key = secrets.token_urlsafe(16)
        if not key.startswith("-"):
            return key


def hash_secret(secret: str) -> str:
    # API keys and tokens are 256-bit random strings, so a plain hash is enough.
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    kind: str
    floor: int
    # the caller's client IP, on the anonymous account of one request (it bounds what one
    # address may hold reserved there: CoordinatorConfig.anonymous_reserved_per_ip)
    requester: str | None = None

    @property
    def anonymous(self) -> bool:
        return self.kind == "anonymous"


def _account(row: Row[Any]) -> Account:
    return Account(id=row.id, name=row.name, kind=row.kind, floor=row.floor)


class Accounts:
    """Creating and finding accounts; invite codes. Part of coordinator.store.Store."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create_account(self, name: str, invite: str | None = None) -> tuple[Account, str]:
        """A new user account with the configured grant; returns it and its API key.

        Forbidden when registration is closed, or invite-only and `invite` is not an unused
        code (the code is used up in the same transaction)."""
        mode = self._db.config.registration
        if mode == "closed":
            raise Forbidden(
                "registration is closed on this coordinator; ask its operator for an account"
            )
        if mode == "invite" and not invite:
            raise Forbidden(
                "registration on this coordinator needs an invite code: ask its operator or a "
                "user for one and send it as `invite`",
                [("invite", "is required here")],
            )
        api_key = new_api_key()
        grant = self._db.config.new_account_grant
        try:
            async with self._db.begin() as conn:
                account_id = (
                    await conn.execute(
                        accounts.insert()
                        .values(
                            name=name,
                            kind="user",
                            api_key_hash=hash_secret(api_key),
                            floor=self._db.config.account_floor,
                            created_at=now(conn),
                        )
                        .returning(accounts.c.id)
                    )
                ).scalar_one()
                await open_balance(conn, account_id)
                if mode == "invite":
                    assert invite is not None
                    await self._use_invite(conn, invite, account_id)
                if grant:
                    await post_entry(
                        conn,
                        reason="grant",
                        key=f"grant:new-account:{account_id}",
                        moves=[(self._db.system_account(GRANTS), -grant), (account_id, grant)],
                    )
        except IntegrityError:
            raise Conflict(
                f"account name {name!r} is taken; choose another name", [("name", "is taken")]
            ) from None
        return Account(account_id, name, "user", self._db.config.account_floor), api_key

    async def _use_invite(self, conn: AsyncConnection, code: str, account_id: int) -> None:
        used = await conn.execute(
            update(invites)
            .where((invites.c.code_hash == hash_secret(code)) & invites.c.used_by.is_(None))
            .values(used_by=account_id, used_at=now(conn))
        )
        if used.rowcount != 1:
            raise Forbidden(
                "this invite code is unknown or already used; each code registers one "
                "account: ask for a new one",
                [("invite", "unknown or already used")],
            )

    async def create_invites(self, count: int, maker: Account | None = None) -> list[str]:
        """`count` new single-use invite codes (shown once; stored hashed). `maker` None is
        the operator (no limit); a user may make `invites_per_account` in all."""
        codes = [secrets.token_urlsafe(16) for _ in range(count)]
        async with self._db.begin() as conn:
            if maker is not None:
                await lock_spender(conn, maker.id)
                made = (
                    await conn.execute(
                        select(func.count())
                        .select_from(invites)
                        .where(invites.c.account_id == maker.id)
                    )
                ).scalar_one()
                cap = self._db.config.invites_per_account
                if cap and await self._invited_without_work(conn, maker.id):
                    raise Forbidden(
                        "an account invited by another user may make invite codes once one "
                        "of its workers has passed a spot check by an independent trusted "
                        "worker (or is trusted): run a worker with this API key, or ask the "
                        "coordinator's operator for codes",
                        [("count", "no invites before verified work")],
                    )
                if int(made) + count > cap:
                    raise Forbidden(
                        f"each account may make {cap} invite codes and you made {made}; "
                        "ask the coordinator's operator for more",
                        [("count", f"must be at most {max(cap - int(made), 0)}")],
                    )
            at = now(conn)
            await conn.execute(
                invites.insert(),
                [
                    {
                        "code_hash": hash_secret(code),
                        "account_id": None if maker is None else maker.id,
                        "created_at": at,
                    }
                    for code in codes
                ],
            )
        return codes

    @staticmethod
    async def _invited_without_work(conn: AsyncConnection, account_id: int) -> bool:
        """True when a user's invite code made `account_id` and none of its workers has
        passed an independent check (or is trusted). Invites must not breed invites for
        free: else one code becomes unlimited accounts, each with its grant."""
        invited = (
            await conn.execute(
                select(invites.c.code_hash).where(
                    (invites.c.used_by == account_id) & invites.c.account_id.is_not(None)
                )
            )
        ).first()
        if invited is None:
            return False
        verified = (
            await conn.execute(
                select(workers.c.id)
                .where(
                    (workers.c.account_id == account_id)
                    & ((workers.c.checks_passed > 0) | (workers.c.trusted == 1))
                )
                .limit(1)
            )
        ).first()
        return verified is None

    async def account_by_key(self, api_key: str) -> Account | None:
        row = await self._db.read_first(_BY_KEY, {"key_hash": hash_secret(api_key)})
        return _account(row) if row else None

    async def account_by_id(self, account_id: int) -> tuple[Account, float] | None:
        """A user account (not a system one) and when it was created."""
        async with self._db.begin() as conn:
            row = (
                await conn.execute(
                    select(accounts).where(
                        (accounts.c.id == account_id) & accounts.c.kind.in_(("user", "worker"))
                    )
                )
            ).first()
        return (_account(row), row.created_at) if row else None

    async def anonymous_account(self, requester: str | None = None) -> Account:
        """The shared anonymous account, as used by the client at IP `requester`."""
        return Account(
            self._db.system_account(ANONYMOUS),
            ANONYMOUS,
            "anonymous",
            self._db.config.anonymous_floor,
            requester,
        )
