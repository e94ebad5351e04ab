"""Rate-limit buckets (in memory, and shared by every process on one PostgreSQL), the
client addresses they key on, and which routes they cover."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from coordinator import app as _routes  # noqa: F401  (registers every route)
from coordinator.config import DEFAULT_RATE_LIMITS, CoordinatorConfig, RateLimit
from coordinator.db.schema import rate_buckets
from coordinator.errors import RateLimited
from coordinator.http.addresses import client_address, parse_networks
from coordinator.http.api import API
from coordinator.http.ratelimit import (
    MemoryBuckets,
    PostgresBuckets,
    RateLimiter,
    Take,
    address_bucket,
)
from coordinator.store import Store
from tests.clock import MockClock
from tests.conftest import POSTGRES_URL, _drop_postgres_database, _postgres_database


async def test_memory_buckets_refill_at_their_rate() -> None:
    clock = MockClock(100.0)
    buckets = MemoryBuckets(clock)
    take = Take("a", rate=2.0, burst=3.0)
    assert await buckets.take([take, take, take]) == [0.0, 0.0, 0.0]
    (wait,) = await buckets.take([take])
    assert wait == pytest.approx(0.5)
    clock.advance(0.4)
    (wait,) = await buckets.take([take])
    assert wait == pytest.approx(0.1)
    clock.advance(0.1)
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
    one, two = (PostgresBuckets(store.db.engine) for store in postgres_engines)
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
    clock = MockClock(1000.0)  # small times: exact enough for approx()
    buckets = PostgresBuckets(store.db.engine, clock)
    take = Take("submit|key|account:7", rate=20.0, burst=2.0)
    assert await buckets.take([take]) == [0.0]
    assert await buckets.take([take]) == [0.0]
    (wait,) = await buckets.take([take])
    assert wait == pytest.approx(0.05)
    clock.advance(0.03)
    (wait,) = await buckets.take([take])
    assert wait == pytest.approx(0.02)  # a refused take took nothing
    clock.advance(0.07)  # 2 tokens at 20/s
    assert await buckets.take([take]) == [0.0]
    assert await buckets.take([take]) == [0.0]
    assert (await buckets.take([take]))[0] > 0
    await buckets.forget(older_than=3600)
    async with store.db.engine.begin() as conn:
        count = (await conn.execute(select(func.count()).select_from(rate_buckets))).scalar_one()
    assert count == 1
    clock.advance(0.05)
    await buckets.forget(older_than=0.06)
    async with store.db.engine.begin() as conn:
        count = (await conn.execute(select(func.count()).select_from(rate_buckets))).scalar_one()
    assert count == 1
    await buckets.forget(older_than=0.04)
    async with store.db.engine.begin() as conn:
        count = (await conn.execute(select(func.count()).select_from(rate_buckets))).scalar_one()
    assert count == 0


@pytest.mark.postgres
async def test_shared_limiter_raises_with_retry_after(
    postgres_engines: tuple[Store, Store],
) -> None:
    limits = {"rate": RateLimit(0.5, 2, 100, 100)}
    one, two = (
        RateLimiter(limits, buckets=PostgresBuckets(store.db.engine)) for store in postgres_engines
    )
    await one.check("rate", "account:1", "::1")
    await two.check("rate", "account:1", "::1")
    with pytest.raises(RateLimited) as limited:
        await one.check("rate", "account:1", "::1")
    assert 1.0 <= limited.value.retry_after <= 2.0 + 1e-6
    assert "API key" in limited.value.message


# --- client addresses -------------------------------------------------------------------

PROXIES = parse_networks(["10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # a proxy we trust: the rightmost hop it did not add itself
        ("10.0.0.5", ["198.51.100.7"], "198.51.100.7"),
        ("10.0.0.5", ["1.2.3.4, 198.51.100.7"], "198.51.100.7"),  # the client's claim: ignored
        ("10.0.0.5", ["198.51.100.7, 10.1.1.1"], "198.51.100.7"),  # two proxies deep
        ("10.0.0.5", ["1.2.3.4", "198.51.100.7, 10.1.1.1"], "198.51.100.7"),  # two headers
        ("10.0.0.5", ["10.3.3.3, 10.1.1.1"], "10.3.3.3"),  # only proxies: the first one
        ("10.0.0.5", [], "10.0.0.5"),  # no header: the proxy itself
        ("10.0.0.5", ["unknown"], "10.0.0.5"),  # garbage from a trusted proxy
        ("10.0.0.5", ["198.51.100.7:5123"], "198.51.100.7"),  # with a port
        ("10.0.0.5", ["[2001:db8::7]:443"], "2001:db8::7"),
        ("10.0.0.5", ["::ffff:198.51.100.7"], "198.51.100.7"),  # IPv4-mapped
        ("::ffff:10.0.0.5", ["198.51.100.7"], "198.51.100.7"),  # a dual-stack listener
        ("fd00::1", ["2001:db8::7"], "2001:db8::7"),
        # anyone else: the header is what they claim, so it is ignored
        ("198.51.100.7", ["10.0.0.1"], "198.51.100.7"),
        ("198.51.100.7", ["203.0.113.1, 10.0.0.1"], "198.51.100.7"),
        ("?", ["203.0.113.1"], "?"),  # no transport address
    ],
)
def test_client_address_believes_only_trusted_proxies(
    peer: str, forwarded: list[str], client: str
) -> None:
    assert client_address(peer, forwarded, PROXIES) == client


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert client_address("127.0.0.1", ["198.51.100.7"], ()) == "127.0.0.1"


def test_bad_networks_are_named() -> None:
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        parse_networks(["10.0.0.1", "10.0.0.0/33"])


def test_ipv6_clients_share_a_bucket_per_64() -> None:
    assert address_bucket("2001:db8:1:2:aaaa::1") == address_bucket("2001:db8:1:2:ffff::9")
    assert address_bucket("2001:db8:1:2::1") != address_bucket("2001:db8:1:3::1")
    assert address_bucket("198.51.100.7") == "198.51.100.7"
    assert address_bucket("?") == "?"


@pytest.mark.slow
def test_the_cli_accepts_every_scope_and_names_a_bad_proxy(tmp_path: Path) -> None:
    flags = [f"--rate-limit={scope}=1/1" for scope in DEFAULT_RATE_LIMITS]
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", "coordinator", "--data-dir", str(tmp_path)]
        + [*flags, "--port", "0", "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "--trusted-proxy" in done.stderr and "'nope'" in done.stderr, done.stderr


# --- every route that changes something or streams is limited -----------------------------


def test_every_mutating_or_streaming_route_has_a_limit() -> None:
    unlimited = [
        f"{route.method} {route.path}"
        for route in API.routes
        if (route.method != "GET" or route.produces == "text/event-stream") and not route.limit
    ]
    assert unlimited == []


def test_every_scope_limits_something() -> None:
    used = {route.limit for route in API.routes}
    assert set(DEFAULT_RATE_LIMITS) <= used
