"""Fixtures shared by the HTTP tests of this package."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from coordinator.config import CoordinatorConfig
from tests.conftest import LiveApp, start_app


@pytest.fixture
async def checked_network(coordinator_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    """Every untrusted result is spot-checked by the operator's (trusted) workers."""
    config = dataclasses.replace(
        coordinator_config,
        spot_check_rate=1.0,
        spot_check_min_rate=1.0,
        max_pixel_steps_per_second=float("inf"),
        trusted_accounts=frozenset({"operator"}),
        verify_distinct_ip=False,  # everyone is on 127.0.0.1 here
    )
    runner, app = await start_app(config)
    try:
        yield app
    finally:
        await runner.cleanup()
