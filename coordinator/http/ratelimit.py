"""Token-bucket rate limits per API key (or worker) and per client IP.

Where the buckets live is pluggable:

- `MemoryBuckets` (SQLite, the embedded single process): a dict in this process.
- `PostgresBuckets` (PostgreSQL): the `rate_buckets` table, so every coordinator process on
  the database (`--processes N`, or several hosts behind a load balancer) draws from the same
  buckets and a burst of N is N in total, not N per process. One `INSERT ... ON CONFLICT DO
  UPDATE` refills and takes in a single atomic statement; times are the database's clock,
  the same for every process (a test may pass a clock of its own).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import ColumnElement, Float, case, cast, extract, func, literal, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.config import RateLimit
from coordinator.db.schema import rate_buckets
from coordinator.errors import RateLimited

__all__ = ["Buckets", "MemoryBuckets", "PostgresBuckets", "RateLimiter", "Take", "address_bucket"]

# buckets kept per process; the least recently used are forgotten first (a forgotten
# bucket is a full one, so forgetting can only be generous)
MAX_BUCKETS = 100_000
# how often shared buckets that have refilled completely are deleted (by each process)
FORGET_INTERVAL = 600.0
# longest bucket key stored; longer keys are hashed
MAX_KEY = 200
# the wait reported when a bucket never refills
NEVER = 3600.0


@dataclass(frozen=True)
class Take:
    """Take one token from the bucket `key` that refills at `rate` per second up to `burst`."""

    key: str
    rate: float
    burst: float


def _wait(tokens: float, rate: float) -> float:
    return (1 - tokens) / rate if rate > 0 else NEVER


class Buckets(Protocol):
    async def take(self, takes: Sequence[Take]) -> list[float]:
        """Take one token from each bucket; per bucket 0 on success, else the seconds until
        one is available (a refused take takes nothing)."""
        ...

    async def forget(self, older_than: float) -> None:
        """Drop buckets untouched for `older_than` seconds (they are full again)."""
        ...


@dataclass
class _Bucket:
    tokens: float
    updated: float


class MemoryBuckets:
    """Buckets of this process only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _take(self, key: str, rate: float, burst: float) -> float:
        now = self._clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        self._buckets[key] = bucket
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return _wait(bucket.tokens, rate)

    async def take(self, takes: Sequence[Take]) -> list[float]:
        return [self._take(t.key, t.rate, t.burst) for t in takes]

    async def forget(self, older_than: float) -> None:
        """The LRU bound keeps memory in check."""


class PostgresBuckets:
    """Buckets in PostgreSQL's `rate_buckets` table, shared by every coordinator process."""

    def __init__(self, engine: AsyncEngine, clock: Callable[[], float] | None = None) -> None:
        self._engine = engine
        self._clock = clock

    def _now(self) -> ColumnElement[float]:
        if self._clock is not None:
            return literal(self._clock(), Float)
        return cast(extract("epoch", func.now()), Float)

    async def take(self, takes: Sequence[Take]) -> list[float]:
        waits = {t.key: _wait(t.burst, t.rate) for t in takes if t.burst < 1}
        asked = [t for t in takes if t.burst >= 1]
        if asked:
            now = self._now()
            # A new bucket is full: it starts at burst - 1 after this take. The proposed row
            # (EXCLUDED) thus carries the burst (tokens + 1) and the database's time.
            proposed = pg_insert(rate_buckets).values(
                [{"key": t.key, "tokens": t.burst - 1, "updated_at": now} for t in asked]
            )
            old, new = rate_buckets.c, proposed.excluded
            rate = case({t.key: t.rate for t in asked}, value=old.key, else_=0.0)
            refilled = func.least(
                new.tokens + 1,
                old.tokens + func.greatest(0.0, new.updated_at - old.updated_at) * rate,
            )
            # Take only when a token is there; a refused take leaves the row alone (its
            # refill continues from the old state, which comes to the same) and returns no row.
            stmt = proposed.on_conflict_do_update(
                index_elements=[old.key],
                set_={
                    "tokens": refilled - 1,
                    "updated_at": func.greatest(old.updated_at, new.updated_at),
                },
                where=refilled >= 1,
            ).returning(old.key)
            async with self._engine.begin() as conn:
                taken = set((await conn.execute(stmt)).scalars().all())
                refused = [t for t in asked if t.key not in taken]
                if refused:
                    rows = (
                        await conn.execute(
                            select(
                                old.key,
                                old.tokens,
                                old.updated_at,
                                self._now(),
                            ).where(old.key.in_([t.key for t in refused]))
                        )
                    ).all()
                    state = {key: (tokens, updated, at) for key, tokens, updated, at in rows}
                    for t in refused:
                        tokens, updated, at = state.get(t.key, (0.0, 0.0, 0.0))
                        tokens = min(t.burst, tokens + max(0.0, at - updated) * t.rate)
                        waits[t.key] = max(_wait(tokens, t.rate), 0.001)
        return [waits.get(t.key, 0.0) for t in takes]

    async def forget(self, older_than: float) -> None:
        now = self._now()
        async with self._engine.begin() as conn:
            await conn.execute(
                rate_buckets.delete().where(rate_buckets.c.updated_at < now - older_than)
            )


@functools.lru_cache(maxsize=4096)
def address_bucket(ip: str) -> str:
    """Whose bucket a client address draws from: its own for IPv4, its /64 for IPv6
    (everyone gets at least a /64 and could otherwise take a fresh address per request)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return ip


def _key(*parts: str) -> str:
    key = "|".join(parts)
    if len(key) > MAX_KEY:
        key = f"{parts[0]}|sha256|{hashlib.sha256(key.encode()).hexdigest()}"
    return key


class RateLimiter:
    def __init__(
        self,
        limits: dict[str, RateLimit],
        clock: Callable[[], float] = time.monotonic,
        buckets: Buckets | None = None,
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._buckets: Buckets = buckets if buckets is not None else MemoryBuckets(clock)
        # a bucket untouched this long has refilled completely: the same as no bucket
        self._full_after = max(
            (
                max(limit.burst / limit.per_second, limit.ip_burst / limit.ip_per_second)
                for limit in limits.values()
                if limit.per_second > 0 and limit.ip_per_second > 0
            ),
            default=NEVER,
        )
        self._forgotten_at = clock()

    @property
    def shared(self) -> bool:
        """True when the buckets are shared between processes."""
        return not isinstance(self._buckets, MemoryBuckets)

    async def check(self, scope: str, identity: str | None, ip: str | None) -> None:
        """Count one `scope` request by `identity` (API key hash or worker id) from `ip`;
        raise RateLimited (429 with Retry-After) when either bucket is empty."""
        limit = self._limits.get(scope)
        if limit is None:
            return
        takes, whose = [], []
        if identity is not None:
            takes.append(Take(_key(scope, "key", identity), limit.per_second, limit.burst))
            whose.append("API key")
        if ip is not None:
            bucket = _key(scope, "ip", address_bucket(ip))
            takes.append(Take(bucket, limit.ip_per_second, limit.ip_burst))
            whose.append("address")
        if not takes:
            return
        if self._clock() - self._forgotten_at > FORGET_INTERVAL:
            self._forgotten_at = self._clock()
            await self._buckets.forget(self._full_after + 60.0)
        waits = await self._buckets.take(takes)
        wait, who = max(zip(waits, whose, strict=True))
        if wait > 0:
            raise RateLimited(
                f"too many {scope} requests from this {who}; retry in {wait:.1f} s "
                "(see the Retry-After header)",
                wait,
            )
