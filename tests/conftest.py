"""Shared fixtures: tiny models, an in-process coordinator, real processes, databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from coordinator.app import create_app
from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.config import CoordinatorConfig
from coordinator.http.state import STORE
from coordinator.store import Store
from tests.clock import MockClock

POSTGRES_URL = os.environ.get(
    "IDLEGRID_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR with sd/, sd-inpaint/, sd2/, sdxl/, sdxl-refiner/ and llm/: prebuilt by
    scripts/test, else built here."""
    prebuilt = os.environ.get("IDLEGRID_TEST_MODELS")
    if prebuilt and (Path(prebuilt) / "sdxl-refiner" / "model_index.json").exists():
        return Path(prebuilt)
    from worker.models.tiny_models import build_tiny_models

    out = tmp_path_factory.mktemp("tiny-models")
    build_tiny_models(out)
    return out


async def _postgres_database() -> tuple[str, str] | None:
    """Create a throwaway database on the test server; None if no server is reachable."""
    import asyncpg

    base = POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://")
    try:
        conn = await asyncpg.connect(base, timeout=3)
    except (OSError, asyncpg.PostgresError):
        return None
    name = f"idlegrid_test_{uuid.uuid4().hex[:12]}"
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, POSTGRES_URL.rsplit("/", 1)[0] + "/" + name


async def _drop_postgres_database(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The same tests on a SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
        return
    created = await _postgres_database()
    if created is None:
        pytest.skip(
            f"no PostgreSQL server reachable at {POSTGRES_URL} (set IDLEGRID_TEST_POSTGRES_URL)"
        )
    name, url = created
    try:
        yield url
    finally:
        await _drop_postgres_database(name)


@pytest.fixture
def coordinator_config(tmp_path: Path, database_url: str) -> CoordinatorConfig:
    return CoordinatorConfig(data_dir=tmp_path / "data", database_url=database_url, port=0)


@pytest.fixture
async def store(coordinator_config: CoordinatorConfig) -> AsyncIterator[Store]:
    coordinator_config.data_dir.mkdir(parents=True, exist_ok=True)
    opened = await Store.open(coordinator_config)
    try:
        yield opened
    finally:
        await opened.aclose()


class LiveApp:
    def __init__(self, app: web.Application, url: str, clock: Clock) -> None:
        self.app = app
        self.url = url
        self.clock = clock

    @property
    def store(self) -> Store:
        return self.app[STORE]


async def start_app(
    config: CoordinatorConfig, clock: Clock = SYSTEM_CLOCK
) -> tuple[web.AppRunner, LiveApp]:
    app = create_app(config, clock)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, LiveApp(app, f"http://127.0.0.1:{port}", clock)


@pytest.fixture
async def live(coordinator_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    """An in-process coordinator on 127.0.0.1 with a free port."""
    runner, app = await start_app(coordinator_config)
    try:
        yield app
    finally:
        await runner.cleanup()


@pytest.fixture
def clock() -> MockClock:
    return MockClock()


@pytest.fixture
async def clocked(
    coordinator_config: CoordinatorConfig, clock: MockClock
) -> AsyncIterator[LiveApp]:
    """`live` on `clock`: leases expire, holds end and the reaper runs when the test
    advances it (tests.clock.reaper_round). Long-polls with nothing to pop wait for it too."""
    runner, app = await start_app(coordinator_config, clock)
    try:
        yield app
    finally:
        await runner.cleanup()


@pytest.fixture
def sqlite_only_config(tmp_path: Path) -> CoordinatorConfig:
    return CoordinatorConfig(data_dir=tmp_path / "data", port=0)
