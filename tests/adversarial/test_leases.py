"""Finding 7 (leases): "Progress reports and text deltas extend a lease forever".

A worker (or gateway) that never finishes but keeps reporting holds its job forever: the
requester waits without end and the reservation stays in escrow. Every lease now has a
hard time-to-live (`lease_ttl_factor` times the job's work at a slow pace, counted from
the pop); reports extend it up to there and no further, then the reaper takes the job back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.messages import JobStatus
from protocol.params import ImageParams
from protocol.text import BUILTIN_DEFAULT_MODEL, BUILTIN_TEXT_MODELS, TextParams, TextStatus
from tests.clock import MockClock, reaper_round
from tests.conftest import LiveApp, start_app
from tests.fakes import CAPS, FakeWorker
from worker.errors import LeaseLost

# seconds on the app's MockClock: no real time passes
LEASE = 30.0  # seconds one report extends the lease by
TTL_FACTOR = 4.0
STEP = 7.0  # between two reports (well inside a lease; no multiple of it lands on a cap)
REAP_INTERVAL = 3600.0  # the reaper stays asleep until the test runs a round
Status = TypeVar("Status", JobStatus, TextStatus)
MODEL = next(m for m in BUILTIN_TEXT_MODELS if m.name == BUILTIN_DEFAULT_MODEL)


@dataclass(frozen=True)
class Held:
    """How long the attacker held the job and how long the coordinator allows."""

    seconds: float
    cap: float


@pytest.fixture
async def live(tmp_path: Path, database_url: str, clock: MockClock) -> AsyncIterator[LiveApp]:
    config = CoordinatorConfig(
        data_dir=tmp_path / "data",
        database_url=database_url,
        port=0,
        lease_timeout=LEASE,
        lease_base_seconds=LEASE,
        lease_ttl_factor=TTL_FACTOR,
        # fast enough that the tiny jobs here are all "work" of well under a second
        lease_pixel_steps_per_second=1e12,
        text_min_tokens_per_second=1000.0,
        reap_interval=REAP_INTERVAL,
    )
    runner, app = await start_app(config, clock)
    try:
        yield app
    finally:
        await runner.cleanup()


async def keep_reporting(
    clock: MockClock, report: Callable[[], Awaitable[object]], cap: float
) -> float:
    """Report every STEP seconds until the lease is lost (told why); the seconds it was
    held."""
    started = clock()
    for _ in range(int(cap * 3 / STEP) + 5):
        try:
            await report()
        except LeaseLost as lost:
            why = str(lost)
            break
        clock.advance(STEP)
    else:
        pytest.fail(f"still holding the job after {clock() - started:.0f} s of reports (cap {cap})")
    assert "time limit" in why, why
    return clock() - started


async def reaped(clock: MockClock, read: Callable[[], Awaitable[Status]]) -> Status:
    """The job once the reaper has taken it back (a report past the cap is refused at once,
    the reaper follows at its next round)."""
    assert (await read()).state == "leased"
    await reaper_round(clock, REAP_INTERVAL)
    return await read()


async def test_progress_forever_loses_the_image_job_at_its_cap(
    live: LiveApp, clock: MockClock
) -> None:
    async with AsyncClient(live.url) as requester, FakeWorker(live.url, "squatter") as worker:
        params = ImageParams(prompt="x", width=64, height=64, steps=10, n=1, seed=1)
        job_id = (await requester.submit_image(params)).id
        job = await worker.link.pop(CAPS, wait=0)
        assert job is not None and job.id == job_id
        cap = TTL_FACTOR * LEASE  # the work of 64x64x10 at 1e12 pixel-steps/s is nothing

        held = await keep_reporting(clock, lambda: worker.link.progress(job.id, 0, 1, 10), cap)

        # reports kept it far past one lease, but not past the cap
        assert cap < held <= cap + STEP, Held(held, cap)
        status = await reaped(clock, lambda: requester.job(job_id))
        assert status.state == "queued", status
        assert status.error is not None and "time limit" in status.error


async def test_text_deltas_forever_lose_the_text_job_at_its_cap(
    live: LiveApp, clock: MockClock
) -> None:
    async with AsyncClient(live.url) as requester, FakeWorker(live.url, "gateway") as gateway:
        assert await gateway.link.pop_text([MODEL], wait=0) is None  # offer the model
        params = TextParams(prompt="hello", max_tokens=4, model=MODEL.name)
        job_id = (await requester.submit_text(params)).id
        job = await gateway.link.pop_text([MODEL], wait=0)
        assert job is not None and job.id == job_id
        cap = TTL_FACTOR * (LEASE + 4 / 1000)  # 4 tokens at 1000/s

        # one character, then the same piece again and again (a "retry" extends the lease)
        held = await keep_reporting(clock, lambda: gateway.link.text_delta(job.id, 0, "a"), cap)

        assert cap < held <= cap + STEP, Held(held, cap)
        status = await reaped(clock, lambda: requester.text_job(job_id))
        assert status.state == "queued", status
        assert status.error is not None and "time limit" in status.error
