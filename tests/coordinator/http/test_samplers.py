"""GET /api/v1/samplers: the sampler list the web page's form is filled from."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from coordinator.config import CoordinatorConfig
from protocol.samplers import DEFAULT_SAMPLER, SAMPLERS
from tests.conftest import LiveApp, start_app


@pytest.fixture
async def live(sqlite_only_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    """The list does not touch the database: SQLite only."""
    runner, app = await start_app(sqlite_only_config)
    try:
        yield app
    finally:
        await runner.cleanup()


async def test_the_samplers_are_protocols_in_order_with_their_cost(live: LiveApp) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{live.url}/api/v1/samplers") as response:
            assert response.status == 200
            listed = await response.json()
        async with http.get(f"{live.url}/api/v1/openapi.json") as response:
            spec = await response.json()
    assert listed == {
        "samplers": [{"name": n, "evaluations_per_step": f} for n, f in SAMPLERS.items()],
        "default": DEFAULT_SAMPLER,
    }
    assert any(f["evaluations_per_step"] == 2 for f in listed["samplers"])
    answer = spec["paths"]["/api/v1/samplers"]["get"]["responses"]["200"]
    assert answer["content"]["application/json"]["schema"]["$ref"].endswith("/SamplerList")
