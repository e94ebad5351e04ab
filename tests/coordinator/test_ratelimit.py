"""Rate-limit buckets: in memory, and shared by every process on one PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from coordinator.config import CoordinatorConfig, RateLimit
from coordinator.db.schema import rate_buckets
from coordinator.errors import RateLimited
from coordinator.http.ratelimit import MemoryBuckets, PostgresBuckets, RateLimiter, Take
from coordinator.store import Store
from tests.conftest import POSTGRES_URL, _drop_postgres_database, _postgres_database


async def test_memory_buckets_refill_at_their_rate() -> None:
    clock = [100.0]
    buckets = MemoryBuckets(lambda: clock[0])
    take = Take("a", rate=2.0, burst=3.0)
    assert await buckets.take([take, take, take]) == [0.0, 0.0, 0.0]
    (wait,) = await buckets.take([take])
    assert wait == pytest.approx(0.5)
    clock[0] += 0.5
    assert await buckets.take([take]) == [0.0]


async def test_limiter_names_the_empty_bucket() -> None:
    limiter = RateLimiter({"submit": RateLimit(1, 5, 1, 2)}, clock=lambda: 0.0)
    await limiter.check("submit", "account:1", "10.0.0.1")
    await limiter.check("submit", "account:2", "10.0.0.1")
    with pytest.raises(RateLimited) as limited:
        await limiter.check("submit", "account:3", "10.0.0.1")
    assert "address" in limited.value.message
    await limiter.check("other scope: unlimited", "account:3", "10.0.0.1")


@pytest.fixture
async def postgres_engines(tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores (two connection pools, as two processes have) on a fresh database."""
    created = await _postgres_database()
    if created is None:
        pytest.skip(f"no PostgreSQL server reachable at {POSTGRES_URL}")
    name, url = created
    config = CoordinatorConfig(data_dir=tmp_path, database_url=url)
    first = await Store.open(config)
    second = await Store.open(config)
    try:
        yield first, second
    finally:
        await first.aclose()
        await second.aclose()
        await _drop_postgres_database(name)


@pytest.mark.postgres
async def test_postgres_buckets_are_shared_between_pools(
    postgres_engines: tuple[Store, Store],
) -> None:
    one, two = (PostgresBuckets(store.engine) for store in postgres_engines)
    take = Take("pop|key|worker:1", rate=0.01, burst=5.0)
    other = Take("pop|ip|127.0.0.1", rate=100.0, burst=1000.0)
    results = await asyncio.gather(*(b.take([take, other]) for b in (one, two) * 5))
    waits = [w for w, _ in results]
    assert sorted(waits)[:5] == [0.0] * 5  # a burst of 5 in total, not 5 per pool
    assert all(w > 10 for w in sorted(waits)[5:]), waits  # about 1/0.01 s for a token
    assert all(o == 0.0 for _, o in results)
    # a refused take took nothing: the wait does not grow
    (again, _) = await one.take([take, other])
    assert again <= min(w for w in waits if w > 0) + 0.001


@pytest.mark.postgres
async def test_postgres_buckets_refill_and_are_forgotten(
    postgres_engines: tuple[Store, Store],
) -> None:
    store, _ = postgres_engines
    buckets = PostgresBuckets(store.engine)
    take = Take("submit|key|account:7", rate=20.0, burst=2.0)
    assert await buckets.take([take]) == [0.0]
    assert await buckets.take([take]) == [0.0]
    (wait,) = await buckets.take([take])
    assert 0 < wait <= 0.05
    await asyncio.sleep(0.1)  # 2 tokens at 20/s
    assert await buckets.take([take]) == [0.0]
    assert await buckets.take([take]) == [0.0]
    assert (await buckets.take([take]))[0] > 0
    await buckets.forget(older_than=3600)
    async with store.engine.begin() as conn:
        count = (await conn.execute(select(func.count()).select_from(rate_buckets))).scalar_one()
    assert count == 1
    await asyncio.sleep(0.05)
    await buckets.forget(older_than=0.01)
    async with store.engine.begin() as conn:
        count = (await conn.execute(select(func.count()).select_from(rate_buckets))).scalar_one()
    assert count == 0


@pytest.mark.postgres
async def test_shared_limiter_raises_with_retry_after(
    postgres_engines: tuple[Store, Store],
) -> None:
    limits = {"rate": RateLimit(0.5, 2, 100, 100)}
    one, two = (
        RateLimiter(limits, buckets=PostgresBuckets(store.engine)) for store in postgres_engines
    )
    await one.check("rate", "account:1", "::1")
    await two.check("rate", "account:1", "::1")
    with pytest.raises(RateLimited) as limited:
        await one.check("rate", "account:1", "::1")
    assert 1.0 <= limited.value.retry_after <= 2.0 + 1e-6
    assert "API key" in limited.value.message
