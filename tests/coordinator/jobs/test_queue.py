"""The queue in SQL: the database's order is protocol.priority's, ranks follow balances,
positions come from one shared snapshot, and only who must wake wakes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.db.ledger import post_entry
from coordinator.db.schema import balances, jobs
from coordinator.http.state import CONFIG, SIGNALS
from coordinator.http.streams import KEEPALIVE_SECONDS
from coordinator.jobs.signals import Signals
from coordinator.store import GRANTS, Account, Store, Worker
from protocol.params import ImageParams
from protocol.priority import Waiting, order
from tests.clock import MockClock
from tests.conftest import LiveApp, start_app
from tests.fakes import CAPS, FakeWorker

SMALL: dict[str, Any] = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 4, "seed": 7}


async def _grant(store: Store, account: Account, amount: int, key: str) -> None:
    async with store.db.begin() as conn:
        await post_entry(
            conn,
            reason="grant",
            key=key,
            moves=[(store.db.system_account(GRANTS), -amount), (account.id, amount)],
        )


async def _worker(store: Store) -> Worker:
    worker, _ = await store.workers.register_worker("w", "a" * 64, None)
    return worker


async def _pop_all(store: Store, worker: Worker) -> list[str]:
    popped = []
    while (job := await store.image_jobs.pop(worker, ["m"], 64 * 64, 10)) is not None:
        popped.append(job.id)
    return popped


async def test_the_database_pops_in_protocol_priority_order(store: Store) -> None:
    """Jobs of requesters with different balances (and anonymous ones), submitted over
    time, come out of the SQL queue in exactly the order protocol.priority defines."""
    rng = random.Random(11)
    clock = [10_000.0]
    store.db.clock = lambda: clock[0]
    accounts = [(await store.accounts.create_account(f"user{i}"))[0] for i in range(5)]
    for i, account in enumerate(accounts):
        await _grant(store, account, rng.choice([0, 3, 40, 900, 70_000]), f"grant:t:{i}")
    anonymous = await store.accounts.anonymous_account()
    kudos = {a.id: await store.ledger.balance(a.id) for a in accounts}
    expected: list[Waiting] = []
    for _ in range(40):
        clock[0] += rng.uniform(0, 90)
        account = rng.choice([*accounts, anonymous])
        # cost 0: balances (and so ranks) stay what `kudos` says
        job = await store.image_jobs.create(account, ImageParams(**SMALL), 0)
        expected.append(
            Waiting(job.id, account.id, kudos.get(account.id, 0), clock[0], account.anonymous)
        )
    worker = await _worker(store)
    assert await _pop_all(store, worker) == [
        w.job_id for w in order(expected, store.db.config.aging)
    ]


async def test_ranks_follow_a_material_balance_change_only(store: Store) -> None:
    clock = [50_000.0]
    store.db.clock = lambda: clock[0]
    config = store.db.config
    early, _ = await store.accounts.create_account("early")
    late, _ = await store.accounts.create_account("late")
    first = await store.image_jobs.create(early, ImageParams(**SMALL), 1)
    clock[0] += 30.0
    second = await store.image_jobs.create(late, ImageParams(**SMALL), 1)
    # a tiny grant moves `late`'s head start by far less than rank_refresh_seconds
    await _grant(store, late, 1, "grant:t:tiny")
    async with store.db.begin() as conn:
        rank_before = (
            await conn.execute(select(jobs.c.rank).where(jobs.c.id == second.id))
        ).scalar_one()
        ranked = (
            await conn.execute(select(balances.c.ranked).where(balances.c.account_id == late.id))
        ).scalar_one()
    # ranked at the 100 granted: the reservation (-1) and the grant (+1) were too small
    assert ranked == 100
    # a big grant (x1000: ~10 doublings = 600 s of head start) re-ranks at once
    await _grant(store, late, 100_000, "grant:t:big")
    async with store.db.begin() as conn:
        rank_after = (
            await conn.execute(select(jobs.c.rank).where(jobs.c.id == second.id))
        ).scalar_one()
    assert rank_before - rank_after > 9 * config.priority_seconds_per_doubling
    worker = await _worker(store)
    assert await _pop_all(store, worker) == [second.id, first.id]


async def test_balance_rows_agree_with_the_ledger(store: Store) -> None:
    alice, _ = await store.accounts.create_account("alice")
    bob, _ = await store.accounts.create_account("bob")
    worker = await _worker(store)
    job = await store.image_jobs.create(alice, ImageParams(**SMALL), 7)
    await _grant(store, bob, 5, "grant:t:bob")
    leased = await store.image_jobs.pop(worker, ["m"], 64 * 64, 10)
    assert leased is not None
    await store.image_jobs.fail(worker, job.id, "engine crashed")
    cancelled = await store.image_jobs.create(bob, ImageParams(**SMALL), 3)
    await store.image_jobs.cancel(cancelled.id)
    audit = await store.ledger.audit()
    assert audit["balance_rows_off"] == 0 and audit["sum"] == 0
    ledger = await store.ledger.balances()
    assert await store.ledger.balance(alice.id) == ledger["alice"] == 93
    assert await store.ledger.balance(bob.id) == ledger["bob"] == 105


async def test_positions_come_from_one_shared_snapshot(store: Store) -> None:
    alice, _ = await store.accounts.create_account("alice")
    ids = [(await store.image_jobs.create(alice, ImageParams(**SMALL), 1)).id for _ in range(5)]
    assert [await store.image_jobs.queue_position(i) for i in ids] == [0, 1, 2, 3, 4]
    snapshot = await store.image_jobs.ranking.snapshot("image")
    # readers within the interval share it: no per-request ranking
    for job_id in ids:
        await store.image_jobs.queue_info(job_id)
    assert await store.image_jobs.ranking.snapshot("image") is snapshot
    # a job queued since the snapshot gets its place from its rank
    late = await store.image_jobs.create(alice, ImageParams(**SMALL), 1)
    assert (await store.image_jobs.queue_info(late.id))[0] == 5


async def test_a_pop_waiter_wakes_only_for_work_it_can_take() -> None:
    clock = MockClock()
    signals = Signals(clock)

    async def waiters() -> tuple[asyncio.Task[bool], asyncio.Task[bool]]:
        sd = asyncio.create_task(signals.wait_for_work("image", ["sd"], 5.0))
        text = asyncio.create_task(signals.wait_for_work("text", ["llm"], 5.0))
        await clock.wait_waiting(count=2)
        return sd, text

    async with asyncio.timeout(10):
        sd, text = await waiters()
        signals.job_queued("image", "other-model")
        signals.job_queued("text", "other-llm")
        clock.advance(5.0)
        # a waiter woken by those would have returned True before its timeout ended
        assert await sd is False and await text is False

        sd, text = await waiters()
        signals.job_queued("image", "sd")
        assert await sd is True
        assert not text.done()
        signals.job_queued("text", None)  # no model: any text gateway may take it
        assert await text is True
    assert signals.waiting_workers == 0 and clock.waiting() == 0


async def test_a_watch_sees_a_change_made_between_two_waits() -> None:
    clock = MockClock()
    signals = Signals(clock)
    with signals.watch("job-1") as watch:
        signals.job_changed("job-1")  # while the watcher was busy elsewhere
        assert await watch.wait(1.0) is True
        waiting = asyncio.create_task(watch.wait(1.0))
        async with asyncio.timeout(10):
            await clock.wait_waiting()
            clock.advance(1.0)
            assert await waiting is False
        assert signals.watched_jobs == 1
    assert signals.watched_jobs == 0


@pytest.fixture
def capped_config(sqlite_only_config: CoordinatorConfig) -> CoordinatorConfig:
    return dataclasses.replace(sqlite_only_config, max_streams_per_key=2, max_streams_per_ip=3)


async def test_event_streams_are_capped_and_leave_nothing_behind(
    capped_config: CoordinatorConfig,
) -> None:
    runner, app = await start_app(capped_config)
    try:
        await _streams_capped(app)
    finally:
        await runner.cleanup()


async def _streams_capped(app: LiveApp) -> None:
    store = app.store
    alice, key = await store.accounts.create_account("alice")
    job = await store.image_jobs.create(alice, ImageParams(**SMALL), 1)
    anon = await store.image_jobs.create(
        await store.accounts.anonymous_account(), ImageParams(**SMALL), 1
    )
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http:
        url = f"{app.url}/api/v1/jobs/{job.id}/events"
        first = await http.get(url, headers=headers)
        second = await http.get(url, headers=headers)
        assert first.status == second.status == 200
        third = await http.get(url, headers=headers)
        assert (
            third.status == 429 and "event streams open" in (await third.json())["error"]["message"]
        )
        assert "Retry-After" in third.headers
        # the address cap counts anonymous streams too
        anon_url = f"{app.url}/api/v1/jobs/{anon.id}/events"
        fourth = await http.get(anon_url)
        assert fourth.status == 200
        fifth = await http.get(anon_url)
        assert fifth.status == 429
        await store.image_jobs.cancel(job.id)
        app.app[SIGNALS].job_changed(job.id)
        await store.image_jobs.cancel(anon.id)
        app.app[SIGNALS].job_changed(anon.id)
        for stream in (first, second, fourth):
            body = await asyncio.wait_for(stream.text(), 10)
            assert '"state":"cancelled"' in body
        for response in (first, second, third, fourth, fifth):
            response.release()
    # a stream stops watching its job before it ends the response the client read to its end
    assert app.app[SIGNALS].watched_jobs == 0


async def test_a_quiet_stream_refreshes_and_keeps_alive_on_the_app_clock(
    clocked: LiveApp, clock: MockClock
) -> None:
    """A queued job's stream re-reads it every stream_refresh_seconds and, while nothing
    changed, sends a keep-alive once KEEPALIVE_SECONDS pass: all on the app's clock."""
    store = clocked.store
    alice, key = await store.accounts.create_account("alice")
    job = await store.image_jobs.create(alice, ImageParams(**SMALL), 1)
    refresh = clocked.app[CONFIG].stream_refresh_seconds
    rounds = math.ceil(KEEPALIVE_SECONDS / refresh) - 1  # refreshes before a keep-alive is due
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{clocked.url}/api/v1/jobs/{job.id}/events", headers=headers) as stream,
        asyncio.timeout(10),
    ):
        assert (await stream.content.readuntil(b"\n\n")).startswith(b"event: status\n")
        # the reaper and the stream, each asleep on the clock
        await clock.wait_waiting(count=2)
        for _ in range(rounds):
            clock.advance(refresh)
            await clock.wait_waiting(count=2)
        clock.advance(refresh)
        await clock.wait_waiting(count=2)
        await store.image_jobs.cancel(job.id)
        clocked.app[SIGNALS].job_changed(job.id)
        # nothing was written before: one keep-alive, then the end
        rest = await stream.content.read()
        assert rest.startswith(b": keepalive\n\nevent: status\n"), rest
        assert rest.count(b"keepalive") == 1 and b'"state":"cancelled"' in rest, rest


async def test_a_long_poll_ends_on_the_app_clock(clocked: LiveApp, clock: MockClock) -> None:
    """A pop that waits 30 s for work gets nothing back once 30 s pass on the app's clock,
    and a job queued meanwhile wakes it at once."""
    async with FakeWorker(clocked.url) as worker, asyncio.timeout(10):
        pop = asyncio.create_task(worker.link.pop(CAPS, wait=30))
        await clock.wait_waiting(count=2)  # the reaper, and the pop waiting for work
        clock.advance(30)
        assert await pop is None
        pop = asyncio.create_task(worker.link.pop(CAPS, wait=30))
        await clock.wait_waiting(count=2)
        async with AsyncClient(clocked.url) as anonymous:
            job = await anonymous.submit_image(ImageParams(**SMALL))
        leased = await pop
        assert leased is not None and leased.id == job.id


async def test_a_worker_that_hangs_up_while_it_waits_is_leased_nothing(
    clocked: LiveApp, clock: MockClock
) -> None:
    """A worker stopped during a long poll: the job queued next stays queued for the
    next worker instead of being leased through the closed connection."""
    async with FakeWorker(clocked.url) as gone, FakeWorker(clocked.url) as other:
        pop = asyncio.create_task(gone.link.pop(CAPS, wait=30))
        await clock.wait_waiting(count=2)  # the reaper, and the pop waiting for work
        pop.cancel()  # its connection closes
        with contextlib.suppress(asyncio.CancelledError):
            await pop
        await asyncio.sleep(0.2)  # (the close reaches the server over loopback)
        async with AsyncClient(clocked.url) as anonymous:
            job = await anonymous.submit_image(ImageParams(**SMALL))
        await asyncio.sleep(0.2)  # (the woken poll, if it leased, has done so)
        queued = await clocked.store.image_jobs.get(job.id)
        assert queued is not None and queued.state == "queued", queued
        leased = await other.link.pop(CAPS, wait=0)
        assert leased is not None and leased.id == job.id
