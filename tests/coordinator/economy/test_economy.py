"""The kudos economy over HTTP: quotes, cancel, transfers, history, ratings, rate limits,
uptime and aging, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from client.errors import ApiError, AuthError, NotEnoughKudos, RateLimited
from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig, RateLimit
from coordinator.db.ledger import balance, grants, post_entry
from coordinator.db.schema import invites, jobs
from coordinator.store import Store
from protocol.cost import image_cost
from protocol.params import ImageParams
from tests.conftest import LiveApp, start_app
from tests.earnings import earn
from tests.fakes import CAPS, FakeWorker, job_pngs, png, register_accounts
from worker.errors import CoordinatorRejected, LeaseLost

SMALL: dict[str, Any] = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 4, "seed": 11}
# 256x256, 20 steps: 3 kudos
MEDIUM: dict[str, Any] = {
    "prompt": "a blue cone",
    "width": 256,
    "height": 256,
    "steps": 20,
    "seed": 5,
}

AppFactory = Callable[..., Awaitable[LiveApp]]


@pytest.fixture
async def make_app(coordinator_config: CoordinatorConfig) -> AsyncIterator[AppFactory]:
    """Start an in-process coordinator with some config fields overridden."""
    runners: list[Any] = []

    async def make(**overrides: Any) -> LiveApp:
        runner, app = await start_app(dataclasses.replace(coordinator_config, **overrides))
        runners.append(runner)
        return app

    yield make
    for runner in reversed(runners):
        await runner.cleanup()


async def _serve_one(worker: FakeWorker, wrong: bool = False) -> str:
    job = await worker.link.pop(CAPS, wait=10)
    assert job is not None
    seeds = job.params.seeds()
    await worker.link.submit(job, seeds, job_pngs(job, offset=1000 if wrong else 0))
    return job.id


async def test_quote_tells_cost_balance_queue_and_submits_nothing(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "alice")
    async with AsyncClient(live.url, key) as alice, FakeWorker(live.url) as worker:
        quote = await alice.quote_image(ImageParams(**MEDIUM))
        assert quote.kudos_cost == image_cost(ImageParams(**MEDIUM)) == 3
        assert (quote.balance, quote.available, quote.affordable) == (100, 100, True)
        assert (quote.queue_length, quote.queue_position, quote.eta_seconds) == (0, 0, None)
        assert (await live.store.ledger.audit())["entries"] == 1  # just the grant
        big = await alice.quote_image(ImageParams(prompt="x", width=2048, height=2048, n=10))
        assert not big.affordable
        # after some throughput there is an ETA, and queued jobs push the position back
        created = await alice.submit_image(ImageParams(**SMALL))
        await _serve_one(worker)
        assert (await alice.job(created.id)).state == "done"
        first = await alice.submit_image(ImageParams(**SMALL))
        assert first.queue_position == 0 and first.eta_seconds is not None
        quote = await alice.quote_image(ImageParams(**SMALL))
        assert quote.queue_length == 1 and quote.queue_position == 1
        assert quote.eta_seconds is not None and quote.eta_seconds > 0
        status = await alice.job(first.id)
        assert status.queue_position == 0 and status.eta_seconds is not None
    async with AsyncClient(live.url) as anon:
        anonymous = await anon.quote_image(ImageParams(**SMALL))
        assert anonymous.anonymous and anonymous.queue_position == 1  # behind alice's job
        with pytest.raises(ApiError) as too_big:
            await anon.quote_image(ImageParams(**{**SMALL, "width": 1024, "height": 1024}))
        assert too_big.value.fields[0][0] == "width"


async def test_cancel_refunds_queued_and_running_jobs(live: LiveApp) -> None:
    alice_key, bob_key = await register_accounts(live.url, "alice", "bob")
    async with (
        AsyncClient(live.url, alice_key) as alice,
        AsyncClient(live.url, bob_key) as bob,
        FakeWorker(live.url) as worker,
    ):
        queued = await alice.submit_image(ImageParams(**MEDIUM))
        assert (await alice.me()).reserved == 3
        with pytest.raises(ApiError) as hidden:
            await bob.cancel(queued.id)
        assert hidden.value.status == 404
        cancelled = await alice.cancel(queued.id)
        assert (cancelled.state, cancelled.refunded) == ("cancelled", 3)
        with pytest.raises(ApiError) as again:
            await alice.cancel(queued.id)
        assert again.value.status == 409
        running = await alice.submit_image(ImageParams(**MEDIUM))
        job = await worker.link.pop(CAPS, wait=5)
        assert job is not None and job.id == running.id
        await alice.cancel(running.id)
        with pytest.raises(LeaseLost):
            await worker.link.submit(job, [5], [png(5)])
        me = await alice.me()
        assert (me.kudos, me.reserved, me.spent) == (100, 0, 0)
        assert (await alice.job(running.id)).state == "cancelled"
    audit = await live.store.ledger.audit()
    assert audit["unbalanced_entries"] == 0
    assert (await live.store.ledger.balances())["system:escrow"] == 0


async def _operator(config: CoordinatorConfig, *args: str) -> subprocess.CompletedProcess[str]:
    """`idlegrid coordinator ARGS` against the database of `config` (operator actions)."""
    return await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "client.cli",
            "coordinator",
            "--data-dir",
            str(config.data_dir),
            "--database-url",
            str(config.database_url),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_transfers_are_idempotent(
    live: LiveApp, coordinator_config: CoordinatorConfig
) -> None:
    alice_key, bob_key = await register_accounts(live.url, "alice", "bob")
    # granted kudos are not transferable: the operator mints some (the only source)
    minted = await _operator(coordinator_config, "--mint", "alice=40")
    assert minted.returncode == 0 and "minted 40 transferable kudos for alice" in minted.stdout
    refused = await _operator(coordinator_config, "--mint", "alice=²")
    assert refused.returncode != 0 and "--mint 'alice=²': use USER=KUDOS" in refused.stderr
    async with AsyncClient(live.url, alice_key) as alice, AsyncClient(live.url, bob_key) as bob:
        first = await alice.transfer("bob", 30, "pay-bob-1")
        replay = await alice.transfer("bob", 30, "pay-bob-1")
        assert replay == first
        # concurrent replays too
        replays = await asyncio.gather(*[alice.transfer("bob", 30, "pay-bob-1") for _ in range(5)])
        assert all(r == first for r in replays)
        with pytest.raises(ApiError) as changed:
            await alice.transfer("bob", 31, "pay-bob-1")
        assert changed.value.status == 409 and changed.value.fields[0][0] == "Idempotency-Key"
        concurrent = await asyncio.gather(
            *[alice.transfer("bob", 1, f"tip-{i % 3}") for i in range(9)]
        )
        assert len({c.id for c in concurrent}) == 3
        me = await alice.me()
        assert (me.kudos, me.unspent_grants, me.transferable) == (140 - 30 - 3, 100, 7)
        assert (await bob.me()).transferred_in == 33
        with pytest.raises(NotEnoughKudos) as too_much:
            await alice.transfer("bob", 8)
        assert too_much.value.fields == [("amount", "must be at most 7")]
        assert "of which 100 are granted kudos" in too_much.value.message
        with pytest.raises(ApiError) as nobody:
            await alice.transfer("nobody", 1)
        assert nobody.value.status == 404
        with pytest.raises(ApiError) as myself:
            await alice.transfer("alice", 1)
        assert myself.value.status == 400
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{live.url}/api/v1/transfers",
            json={"to": "bob", "amount": 1},
            headers={"apikey": alice_key},
        ) as resp,
    ):
        body = await resp.json()
        assert resp.status == 400
        assert body["error"]["fields"][0]["field"] == "Idempotency-Key"
    assert (await live.store.ledger.audit())["sum"] == 0


async def test_account_show_and_history(live: LiveApp) -> None:
    alice_key, bob_key = await register_accounts(live.url, "alice", "bob")
    async with (
        AsyncClient(live.url, alice_key) as alice,
        AsyncClient(live.url, bob_key) as bob,
        FakeWorker(live.url, "w1", bob_key) as worker,
    ):
        await earn(live.store, "alice", 10)
        done = await alice.submit_image(ImageParams(**MEDIUM))
        await _serve_one(worker)
        await alice.submit_image(ImageParams(**MEDIUM))  # stays queued
        await alice.transfer("bob", 7, "k1")
        me = await alice.me()
        assert (me.kudos, me.reserved, me.spent, me.granted) == (110 - 3 - 3 - 7, 3, 3, 100)
        assert me.transferred_out == 7 and me.available == me.kudos
        # jobs spent the grant first; what was earned stays transferable
        assert (me.unspent_grants, me.transferable) == (94, 3)
        owner = await bob.me()
        # the worker is untrusted: half (rounded down) of its 3 kudos is held pending
        assert (owner.earned, owner.pending, owner.transferred_in) == (2, 1, 7)
        # alice's grants paid that job, so its pay arrives as grants (issue 26)
        assert (owner.unspent_grants, owner.transferable) == (102, 7)
        page = await alice.history()
        reasons = [(e.reason, e.amount) for e in page.entries]
        assert reasons == [
            ("transfer", -7),
            ("reserve", -3),
            ("reserve", -3),
            ("mint", 10),
            ("grant", 100),
        ]
        assert page.entries[0].counterparties == ["bob"]
        assert page.entries[2].job_id == done.id
        older = await alice.history(limit=2)
        assert older.next_before is not None and len(older.entries) == 2
        rest = await alice.history(limit=10, before=older.next_before)
        assert [e.reason for e in rest.entries] == ["reserve", "mint", "grant"]
        bobs = await bob.history()
        assert [e.reason for e in bobs.entries] == ["transfer", "settle", "grant"]
        assert bobs.entries[1].amount == 2
        with pytest.raises(ApiError) as bad:
            await alice.history(limit=0)
        assert bad.value.fields[0][0] == "limit"


async def test_ratings_reward_once_and_aggregate(live: LiveApp) -> None:
    alice_key, bob_key, carol_key = await register_accounts(live.url, "alice", "bob", "carol")
    async with (
        AsyncClient(live.url, alice_key) as alice,
        AsyncClient(live.url, bob_key) as bob,
        AsyncClient(live.url, carol_key) as carol,
        FakeWorker(live.url) as worker,
    ):
        created = await alice.submit_image(ImageParams(**{**MEDIUM, "n": 2, "steps": 40}))
        assert created.kudos_cost == 10
        with pytest.raises(ApiError) as early:
            await alice.rate(created.id, 0, 7)
        assert early.value.status == 404 and early.value.fields[0][0] == "index"
        await _serve_one(worker)
        first = await alice.rate(created.id, 0, 8)
        assert (first.kudos_earned, first.rating, first.ratings) == (1, 8.0, 1)
        with pytest.raises(ApiError) as twice:
            await alice.rate(created.id, 0, 9)
        assert twice.value.status == 409
        await alice.rate(created.id, 1, 3)
        # others cannot rate (or see) it until it is shared
        with pytest.raises(ApiError) as private:
            await bob.rate(created.id, 0, 10)
        assert private.value.status == 404
        with pytest.raises(ApiError) as not_theirs:
            await bob.share(created.id)
        assert not_theirs.value.status == 404
        assert (await alice.share(created.id)).shared
        seen = await bob.job(created.id)
        assert seen.shared and seen.images[0].rating == 8.0
        assert (await bob.rate(created.id, 0, 10)).rating == 9.0
        assert (await carol.rate(created.id, 0, 6)).ratings == 3
        with pytest.raises(ApiError) as bad_score:
            await carol.rate(created.id, 1, 11)
        assert bad_score.value.fields[0][0] == "score"
        assert len(await bob.image(created.id, 0)) > 0
        status = await alice.job(created.id)
        assert [(i.rating, i.ratings) for i in status.images] == [(8.0, 3), (3.0, 1)]
        assert worker.link.worker_id is not None
        record = await alice.worker(worker.link.worker_id)
        assert record.ratings == 4 and record.rating == pytest.approx(27 / 4)
        assert (await bob.me()).kudos == 101  # bob earned 1 for rating
    balances = await live.store.ledger.balances()
    assert balances["system:grants"] == -(3 * 100 + 4)


async def test_rating_own_cheap_jobs_never_pays_for_the_job(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "alice")
    async with AsyncClient(live.url, key) as alice, FakeWorker(live.url) as worker:
        created = await alice.submit_image(ImageParams(**{**SMALL, "n": 4}))
        assert created.kudos_cost == 1
        await _serve_one(worker)
        earned = [(await alice.rate(created.id, i, 5)).kudos_earned for i in range(4)]
        assert earned == [0, 0, 0, 0]


async def test_rate_limits_answer_429_with_retry_after(make_app: AppFactory) -> None:
    app = await make_app(rate_limits={"submit": RateLimit(0.5, 2, 100, 100)})
    (key,) = await register_accounts(app.url, "alice")
    async with AsyncClient(app.url, key) as alice:
        await alice.submit_image(ImageParams(**SMALL))
        await alice.submit_image(ImageParams(**SMALL))
        with pytest.raises(RateLimited) as limited:
            await alice.submit_image(ImageParams(**SMALL))
        assert limited.value.status == 429 and limited.value.retry_after >= 1
        assert "submit" in limited.value.message
        assert (await alice.me()).reserved == 2  # the refused request stored nothing
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{app.url}/api/v1/jobs/image", json=SMALL, headers={"apikey": key}) as resp,
    ):
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1


async def test_rate_limits_per_ip_cover_anonymous_pops_and_ratings(make_app: AppFactory) -> None:
    app = await make_app(
        rate_limits={
            "submit": RateLimit(100, 100, 0.1, 3),
            "pop": RateLimit(0.1, 2, 100, 100),
        }
    )
    async with AsyncClient(app.url) as anon:
        for _ in range(3):
            await anon.submit_image(ImageParams(**SMALL))
        with pytest.raises(RateLimited):
            await anon.submit_image(ImageParams(**SMALL))
    async with FakeWorker(app.url) as worker:
        await worker.link.pop(CAPS, wait=0)
        await worker.link.pop(CAPS, wait=0)
        with pytest.raises(CoordinatorRejected) as refused:
            await worker.link.pop(CAPS, wait=0)
        assert refused.value.status == 429


async def test_uptime_kudos_for_workers_that_stay_online_and_serve(make_app: AppFactory) -> None:
    # owner's workers are trusted (the operator's seed); farmer's are not, and with no
    # trusted referee of another owner around nothing of theirs is ever checked
    app = await make_app(
        uptime_period=10.0,
        uptime_reward=4,
        uptime_grace=5.0,
        trusted_accounts=frozenset({"owner"}),
    )
    # the store's clock, near real time (workers sign registrations with the real time);
    # t0 + 1000 is a multiple of the 10 s period, so the comments' times are exact
    t0 = math.floor(time.time() / 100) * 100 - 1000.0
    clock = [t0 + 1001.0]
    app.store.db.clock = lambda: clock[0]
    owner_key, farmer_key = await register_accounts(app.url, "owner", "farmer")
    async with (
        FakeWorker(app.url, "w1", owner_key) as worker,
        FakeWorker(app.url, "w2", farmer_key) as unchecked,
        AsyncClient(app.url) as anon,
    ):
        await worker.link.pop(CAPS, wait=0)  # online since t=1001
        await unchecked.link.pop(CAPS, wait=0)
        await anon.submit_image(ImageParams(**SMALL))
        await _serve_one(worker)
        await anon.submit_image(ImageParams(**SMALL))
        await _serve_one(unchecked)
        for t in range(1002, 1026, 3):  # polls every 3 s: never a gap over the grace
            clock[0] = t0 + t
            await worker.link.pop(CAPS, wait=0)
            await unchecked.link.pop(CAPS, wait=0)
        balances = await app.store.ledger.balances()
        # online throughout the period [1010, 1020), but not [1000, 1010): 4 kudos, in full
        # (trusted), as grants like the anonymous job's pay (issue 26)
        assert balances["owner"] == 100 + 1 + 4
        # unverified work earns no uptime: only its job's pay
        assert balances["farmer"] == 100 + 1
        clock[0] = t0 + 1040.0  # a long pause breaks the stretch: no kudos for [1030, 1040)
        await worker.link.pop(CAPS, wait=0)
        clock[0] = t0 + 1042.0
        await worker.link.pop(CAPS, wait=0)
        assert (await app.store.ledger.balances())["owner"] == 105
    history = [e for e in (await _history(app.url, owner_key)) if e["reason"] == "uptime"]
    assert len(history) == 1
    async with AsyncClient(app.url, owner_key) as owner:
        me = await owner.me()
    assert (me.kudos, me.unspent_grants, me.transferable) == (105, 105, 0)


async def _history(url: str, key: str) -> list[dict[str, Any]]:
    headers = {"apikey": key}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/api/v1/accounts/me/history", headers=headers) as resp,
    ):
        entries: list[dict[str, Any]] = (await resp.json())["entries"]
        return entries


async def test_aging_lets_an_old_poor_job_beat_newer_rich_ones(make_app: AppFactory) -> None:
    app = await make_app(priority_seconds_per_doubling=2.0, new_account_grant=0)
    store: Store = app.store
    poor, _ = await store.accounts.create_account("poor")
    rich, _ = await store.accounts.create_account("rich")
    async with store.db.begin() as conn:
        from coordinator.db.ledger import post_entry

        await post_entry(
            conn,
            reason="grant",
            key="grant:test:rich",
            moves=[(store.db.system_account("system:grants"), -1023), (rich.id, 1023)],
        )
    clock = [5000.0]
    store.db.clock = lambda: clock[0]
    params = ImageParams(**SMALL)
    free = ImageParams(**{**SMALL, "steps": 1, "width": 64})
    assert image_cost(free) == 1
    # the poor account may go 1 below zero for this test's one job
    poor_job = await store.image_jobs.create(dataclasses.replace(poor, floor=-1), free, 1)
    # rich's head start is 2 s x log2(1 + ~1000) = ~20 s
    clock[0] = 5010.0
    rich_early = await store.image_jobs.create(rich, params, 1)
    clock[0] = 5030.0
    rich_late = await store.image_jobs.create(rich, params, 1)
    assert [
        await store.image_jobs.queue_position(j.id) for j in (rich_early, poor_job, rich_late)
    ] == [
        0,
        1,
        2,
    ]
    worker, _ = await store.workers.register_worker("w", "e" * 64, None)
    popped = []
    while (job := await store.image_jobs.pop(worker, ["m"], 64 * 64, 10)) is not None:
        popped.append(job.id)
    assert popped == [rich_early.id, poor_job.id, rich_late.id]


async def test_worker_record_is_public_but_holds_no_secrets(live: LiveApp) -> None:
    async with FakeWorker(live.url, "visible") as worker, AsyncClient(live.url) as anon:
        assert worker.link.worker_id is not None
        await worker.link.report_engine(
            {"engine": "diffusers", "versions": {"torch": "2.13.0"}, "device": "cpu"}
        )
        record = await anon.worker(worker.link.worker_id)
        assert (record.name, record.trusted, record.paused) == ("visible", False, False)
        assert record.engine is not None and record.engine.versions == {"torch": "2.13.0"}
        with pytest.raises(ApiError) as missing:
            await anon.worker("0" * 32)
        assert missing.value.status == 404


async def test_closed_registration_refuses_with_403(make_app: AppFactory) -> None:
    app = await make_app(registration="closed")
    async with AsyncClient(app.url) as anon:
        with pytest.raises(AuthError) as refused:
            await anon.register("alice")
    assert refused.value.status == 403
    assert "registration is closed on this coordinator" in refused.value.message
    assert (await app.store.ledger.audit())["entries"] == 0


async def test_invite_registration_takes_each_code_once(
    make_app: AppFactory, coordinator_config: CoordinatorConfig
) -> None:
    # the operator makes codes from the command line, against the same database
    made = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "client.cli",
            "coordinator",
            "--data-dir",
            str(coordinator_config.data_dir),
            "--database-url",
            str(coordinator_config.database_url),
            "--make-invites",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    first, second = made.stdout.split()
    app = await make_app(registration="invite", invites_per_account=1)
    async with AsyncClient(app.url) as anon:
        with pytest.raises(AuthError) as no_code:
            await anon.register("alice")
        assert no_code.value.fields == [("invite", "is required here")]
        alice = await anon.register("alice", first)
        assert alice.kudos == 100
        with pytest.raises(AuthError) as reused:
            await anon.register("bob", first)
        assert "unknown or already used" in reused.value.message
        with pytest.raises(AuthError):
            await anon.register("bob", "made-up-code")
        await anon.register("bob", second)
    # a user may make --invites-per-account codes in all
    async with AsyncClient(app.url, alice.api_key) as grid, AsyncClient(app.url) as anon:
        (code,) = await grid.invite()
        with pytest.raises(AuthError) as capped:
            await grid.invite()
        assert "each account may make 1 invite codes and you made 1" in capped.value.message
        assert (await anon.register("carol", code)).name == "carol"
    async with app.store.db.begin() as conn:
        stored = (await conn.execute(select(invites.c.code_hash))).scalars().all()
    assert first not in stored and len(stored) == 3  # only hashes are kept


async def test_one_address_cannot_drain_the_anonymous_account(make_app: AppFactory) -> None:
    app = await make_app(anonymous_reserved_per_ip=7)
    async with AsyncClient(app.url) as anon:
        held = [await anon.submit_image(ImageParams(**MEDIUM)) for _ in range(2)]  # 3 + 3
        with pytest.raises(NotEnoughKudos) as refused:
            await anon.submit_image(ImageParams(**MEDIUM))
        assert "at most 7 may be reserved at once without an API key" in refused.value.message
        assert "hold 6 kudos reserved" in refused.value.message
        # a finished or cancelled job frees its share
        await anon.cancel(held[0].id)
        await anon.submit_image(ImageParams(**MEDIUM))
    # registered requesters are not bound by it
    (key,) = await register_accounts(app.url, "alice")
    async with AsyncClient(app.url, key) as alice:
        for _ in range(3):
            await alice.submit_image(ImageParams(**MEDIUM))


async def test_refunds_give_grants_back_as_grants(live: LiveApp) -> None:
    store = live.store
    alice, _ = await store.accounts.create_account("alice")
    await earn(store, "alice", 50)
    params = ImageParams(prompt="x", width=512, height=512, steps=20, n=6, seed=1)
    cost = image_cost(params)
    assert cost == 60
    job = await store.image_jobs.create(alice, params, cost)
    async with store.db.begin() as conn:
        spent = (
            await conn.execute(select(jobs.c.grant_spent).where(jobs.c.id == job.id))
        ).scalar_one()
        assert spent == 60  # the grant pays first
        assert await grants(conn, alice.id) == 40
        # a text job's settlement refunds part of a reservation: grants come back first
        await post_entry(
            conn,
            reason="refund",
            key=f"refund:{job.id}",
            job_id=job.id,
            moves=[(store.db.system_account("system:escrow"), -25), (alice.id, 25)],
        )
        assert await grants(conn, alice.id) == 65
    second = await store.image_jobs.create(alice, params, cost)
    assert await store.image_jobs.cancel(second.id) == 60
    async with store.db.begin() as conn:
        assert await grants(conn, alice.id) == 65  # 65 spent, 65 given back
        assert await balance(conn, alice.id) == 150 - 60 + 25
    audit = await store.ledger.audit()
    assert (audit["balance_rows_off"], audit["grants_off"]) == (0, 0)
