"""Finding 9: "Limits with holes" -- only submit, pop, rate and transfer were limited, and
buckets keyed on the socket address, so behind a reverse proxy everyone shared one bucket.

The attacker floods each mutating or streaming route (a bad body or an unknown job costs
them nothing and still costs the coordinator a request); every route now answers 429 with
Retry-After once its bucket is empty. Behind a configured proxy each client has its own
bucket, and without that configuration an invented X-Forwarded-For changes nothing.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from coordinator.config import DEFAULT_RATE_LIMITS, CoordinatorConfig, RateLimit
from tests.conftest import LiveApp, start_app
from tests.fakes import FakeWorker

BURST = 3
TIGHT = RateLimit(0.001, BURST, 0.001, BURST)
JOB = str(uuid.uuid4())  # nobody's job: the limit is met before the lookup

# (scope, method, path, who calls): every mutating or streaming route
FLOODS = [
    ("register", "POST", "/api/v1/accounts", "anyone"),
    ("worker", "POST", "/api/v1/workers/register", "anyone"),
    ("challenge", "POST", "/api/v1/workers/challenge", "anyone"),
    ("challenge", "POST", "/api/v1/invites", "user"),
    ("quote", "POST", "/api/v1/quotes/image", "anyone"),
    ("quote", "POST", "/api/v1/quotes/text", "user"),
    ("stream", "GET", f"/api/v1/jobs/{JOB}/events", "anyone"),
    ("stream", "GET", f"/api/v1/text/jobs/{JOB}/events", "user"),
    ("cancel", "POST", f"/api/v1/jobs/{JOB}/cancel", "anyone"),
    ("cancel", "POST", f"/api/v1/text/jobs/{JOB}/cancel", "user"),
    ("share", "POST", f"/api/v1/jobs/{JOB}/share", "user"),
    ("submit", "POST", "/v1/chat/completions", "anyone"),
    ("submit", "POST", "/v1/completions", "user"),
    ("progress", "POST", f"/api/v1/jobs/{JOB}/progress", "worker"),
    ("delta", "POST", f"/api/v1/text/jobs/{JOB}/delta", "worker"),
    ("result", "PUT", f"/api/v1/jobs/{JOB}/images/0", "worker"),
    ("result", "POST", f"/api/v1/jobs/{JOB}/result", "worker"),
    ("result", "POST", f"/api/v1/jobs/{JOB}/fail", "worker"),
    ("result", "POST", f"/api/v1/text/jobs/{JOB}/result", "worker"),
    ("result", "POST", f"/api/v1/text/jobs/{JOB}/fail", "worker"),
    ("engine", "POST", "/api/v1/workers/engine", "worker"),
    ("peer", "POST", "/api/v1/workers/peers", "worker"),
]

Factory = Callable[..., Awaitable[LiveApp]]


@pytest.fixture
async def make_app(tmp_path: Any, database_url: str) -> AsyncIterator[Factory]:
    runners: list[Any] = []

    async def make(**overrides: Any) -> LiveApp:
        config = CoordinatorConfig(data_dir=tmp_path / "data", database_url=database_url, port=0)
        runner, app = await start_app(dataclasses.replace(config, **overrides))
        runners.append(runner)
        return app

    yield make
    for runner in reversed(runners):
        await runner.cleanup()


def tightened(scope: str) -> dict[str, RateLimit]:
    return {**DEFAULT_RATE_LIMITS, scope: TIGHT}


async def register(http: aiohttp.ClientSession, url: str, name: str, **headers: str) -> int:
    async with http.post(f"{url}/api/v1/accounts", json={"name": name}, headers=headers) as r:
        return r.status


@pytest.mark.parametrize(
    ("scope", "method", "path", "who"),
    FLOODS,
    ids=[f"{f[1]} {f[2].replace(JOB, '{id}')}" for f in FLOODS],
)
async def test_a_flood_of_any_mutating_or_streaming_request_is_limited(
    make_app: Factory, scope: str, method: str, path: str, who: str
) -> None:
    app = await make_app(rate_limits=tightened(scope))
    headers: dict[str, str] = {}
    async with aiohttp.ClientSession() as http:
        if who == "user":
            async with http.post(f"{app.url}/api/v1/accounts", json={"name": "mallory"}) as r:
                headers["apikey"] = (await r.json())["api_key"]
        if who == "worker":
            async with FakeWorker(app.url, "mallory") as worker:
                headers["X-Worker-Token"] = worker.link.token or ""
        statuses = []
        for _ in range(BURST + 2):
            async with http.request(method, app.url + path, json={}, headers=headers) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    assert int(resp.headers["Retry-After"]) >= 1
                    assert scope in (await resp.json())["error"]["message"]
    assert 429 not in statuses[:BURST], statuses
    assert statuses[BURST:] == [429, 429], statuses


async def test_registering_accounts_is_limited_per_address_by_default(make_app: Factory) -> None:
    app = await make_app()
    burst = int(DEFAULT_RATE_LIMITS["register"].ip_burst)
    async with aiohttp.ClientSession() as http:
        created = [await register(http, app.url, f"sybil{i}") for i in range(burst)]
        assert created == [201] * burst  # a household, a small class: fine
        assert await register(http, app.url, "one-too-many") == 429


async def test_behind_a_trusted_proxy_each_client_has_its_own_bucket(make_app: Factory) -> None:
    app = await make_app(rate_limits=tightened("register"), trusted_proxies=("127.0.0.1/32",))
    async with aiohttp.ClientSession() as http:

        async def via_proxy(name: str, client: str) -> int:
            # what nginx sends: whatever the client claimed, then the address it saw
            forwarded = f"203.0.113.99, {client}"
            return await register(http, app.url, name, **{"X-Forwarded-For": forwarded})

        assert [await via_proxy(f"a{i}", "198.51.100.1") for i in range(BURST)] == [201] * BURST
        assert await via_proxy("a-again", "198.51.100.1") == 429
        # another client behind the same proxy is not punished for the first one's flood
        assert await via_proxy("bee", "198.51.100.2") == 201
        # IPv6 clients are counted by /64: a whole subnet is one client
        assert [await via_proxy(f"c{i}", f"2001:db8::{i + 1}") for i in range(BURST)] == [
            201
        ] * BURST
        assert await via_proxy("c-again", "2001:db8::ffff") == 429


async def test_a_spoofed_forwarded_for_does_not_dodge_the_limit(make_app: Factory) -> None:
    app = await make_app(rate_limits=tightened("register"))  # no trusted proxy
    async with aiohttp.ClientSession() as http:
        statuses = [
            await register(http, app.url, f"spoof{i}", **{"X-Forwarded-For": f"10.9.8.{i}"})
            for i in range(BURST + 1)
        ]
    assert statuses == [201] * BURST + [429]
