"""The store on SQLite and on PostgreSQL: jobs, leases, priority and the ledger."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coordinator.db.ledger import post_entry
from coordinator.errors import Conflict, InsufficientKudos
from coordinator.store import GRANTS, Account, ResultRecord, Store, Worker
from protocol.cost import image_cost
from protocol.params import ImageParams

SMALL: dict[str, Any] = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 4, "seed": 7}


async def _user(store: Store, name: str) -> Account:
    account, _ = await store.accounts.create_account(name)
    return account


async def _worker(store: Store, name: str = "w1", key: str = "a" * 64) -> Worker:
    worker, _ = await store.workers.register_worker(name, key, None)
    return worker


async def _submit(store: Store, account: Account, **overrides: object) -> str:
    params = ImageParams(**{**SMALL, **overrides})
    job = await store.image_jobs.create(account, params, image_cost(params))
    return job.id


def _records(n: int, seed: int = 7) -> list[ResultRecord]:
    return [ResultRecord(i, seed + i, f"{i:064x}", "0" * 128) for i in range(n)]


async def _assert_ledger_consistent(store: Store) -> None:
    audit = await store.ledger.audit()
    assert audit["unbalanced_entries"] == 0
    assert audit["sum"] == 0


async def test_new_account_gets_the_grant_and_names_are_unique(store: Store) -> None:
    alice = await _user(store, "alice")
    assert await store.ledger.balance(alice.id) == 100
    with pytest.raises(Conflict, match="taken"):
        await store.accounts.create_account("alice")
    await _assert_ledger_consistent(store)


async def test_api_key_lookup_uses_the_hash(store: Store) -> None:
    account, key = await store.accounts.create_account("bob")
    assert (await store.accounts.account_by_key(key)) == account
    assert await store.accounts.account_by_key(key + "x") is None


async def test_full_job_life_pays_the_worker_once(store: Store) -> None:
    alice = await _user(store, "alice")
    worker = await _worker(store)
    job_id = await _submit(store, alice)
    job = await store.image_jobs.get(job_id)
    assert job is not None and job.state == "queued"
    assert await store.ledger.balance(alice.id) == 100 - job.cost  # reserved at submission
    leased = await store.image_jobs.pop(worker, ["any"], 64 * 64, 10)
    assert leased is not None and leased.id == job_id and leased.state == "leased"
    assert await store.image_jobs.pop(worker, ["any"], 64 * 64, 10) is None
    await store.image_jobs.report_progress(worker, job_id, 0, 2, 4)
    earned = await store.image_jobs.complete(worker, leased, _records(1))
    assert earned == job.cost
    assert await store.ledger.balance(worker.account_id) == job.cost
    assert await store.ledger.balance(alice.id) == 100 - job.cost
    with pytest.raises(Conflict):
        await store.image_jobs.complete(worker, leased, _records(1))
    assert await store.ledger.balance(worker.account_id) == job.cost
    assert [r.index for r in await store.image_jobs.results(job_id)] == [0]
    await _assert_ledger_consistent(store)


async def test_insufficient_kudos_stores_nothing(store: Store) -> None:
    alice = await _user(store, "alice")
    big = ImageParams(prompt="x", width=1024, height=1024, steps=150, n=10)
    with pytest.raises(InsufficientKudos, match="costs"):
        await store.image_jobs.create(alice, big, image_cost(big))
    assert await store.ledger.balance(alice.id) == 100
    assert await store.image_jobs.queue_position("nope") is None
    audit = await store.ledger.audit()
    assert audit["entries"] == 1  # only the grant


async def test_richer_requester_is_served_first_and_anonymous_last(store: Store) -> None:
    poor = await _user(store, "poor")
    rich = await _user(store, "rich")
    worker = await _worker(store)
    anon = await store.accounts.anonymous_account()
    anon_job = await _submit(store, anon)
    poor_job = await _submit(store, poor)
    rich_worker, _ = await store.workers.register_worker("rw", "b" * 64, rich)
    rich_first = await _submit(store, rich)
    # equal balances: first come first served; anonymous last despite being first
    assert await store.image_jobs.queue_position(poor_job) == 0
    assert await store.image_jobs.queue_position(rich_first) == 1
    assert await store.image_jobs.queue_position(anon_job) == 2
    # a worker serves its owner's own jobs first, and its owner earns
    first = await store.image_jobs.pop(rich_worker, ["m"], 64 * 64, 10)
    assert first is not None and first.id == rich_first
    await store.image_jobs.complete(rich_worker, first, _records(1))
    # now rich gets richer (ranks follow balance changes worth rank_refresh_seconds of
    # head start or more), so rich's new job jumps ahead of poor's older ones
    async with store.db.begin() as conn:
        await post_entry(
            conn,
            reason="grant",
            key="grant:test:rich",
            moves=[(store.db.system_account(GRANTS), -300), (rich.id, 300)],
        )
    poor_next = await _submit(store, poor)
    rich_next = await _submit(store, rich)
    order = []
    while (job := await store.image_jobs.pop(worker, ["m"], 64 * 64, 10)) is not None:
        order.append(job.id)
    assert order == [rich_next, poor_job, poor_next, anon_job]
    await _assert_ledger_consistent(store)


async def test_pop_respects_capabilities(store: Store) -> None:
    alice = await _user(store, "alice")
    worker = await _worker(store)
    job_id = await _submit(store, alice, width=128, height=128, steps=8, model="sd-a")
    assert await store.image_jobs.pop(worker, ["sd-a"], 64 * 64, 10) is None  # too many pixels
    assert await store.image_jobs.pop(worker, ["sd-a"], 128 * 128, 4) is None  # too many steps
    assert await store.image_jobs.pop(worker, ["sd-b"], 128 * 128, 10) is None  # other model
    job = await store.image_jobs.pop(worker, ["sd-b", "sd-a"], 128 * 128, 10)
    assert job is not None and job.id == job_id


async def test_expired_lease_requeues_and_only_the_finisher_is_paid(store: Store) -> None:
    alice = await _user(store, "alice")
    slow = await _worker(store, "slow", "c" * 64)
    fast = await _worker(store, "fast", "d" * 64)
    job_id = await _submit(store, alice)
    lost = await store.image_jobs.pop(slow, ["m"], 64 * 64, 10)
    assert lost is not None
    assert await store.reap_expired() == []
    real_clock = store.db.clock
    store.db.clock = lambda: lost.lease_deadline + 1  # type: ignore[operator]
    assert await store.reap_expired() == [(job_id, "image", None)]
    store.db.clock = real_clock
    requeued = await store.image_jobs.get(job_id)
    assert requeued is not None and requeued.state == "queued" and requeued.attempts == 1
    with pytest.raises(Conflict, match="not leased"):
        await store.image_jobs.report_progress(slow, job_id, 0, 1, 4)
    again = await store.image_jobs.pop(fast, ["m"], 64 * 64, 10)
    assert again is not None and again.id == job_id
    with pytest.raises(Conflict):
        await store.image_jobs.complete(slow, lost, _records(1))
    await store.image_jobs.complete(fast, again, _records(1))
    assert await store.ledger.balance(slow.account_id) == 0
    assert await store.ledger.balance(fast.account_id) == again.cost
    await _assert_ledger_consistent(store)


async def test_repeated_failures_fail_the_job_and_refund(store: Store) -> None:
    alice = await _user(store, "alice")
    # two owners: one owner's workers alone cannot fail a job for its requester
    worker, other = await _worker(store), await _worker(store, "w2", "b" * 64)
    job_id = await _submit(store, alice)
    for attempt, by in enumerate((worker, worker, other)):
        job = await store.image_jobs.pop(by, ["m"], 64 * 64, 10)
        assert job is not None, attempt
        failed = await store.image_jobs.fail(by, job_id, "engine crashed")
        if attempt == 1:
            # given back twice by its owner: it waits for another owner's worker
            assert await store.image_jobs.pop(worker, ["m"], 64 * 64, 10) is None
    assert failed.state == "failed" and failed.attempts == 3
    assert "engine crashed" in (failed.error or "")
    assert await store.ledger.balance(alice.id) == 100
    assert await store.image_jobs.pop(worker, ["m"], 64 * 64, 10) is None
    await _assert_ledger_consistent(store)


async def test_concurrent_pops_lease_each_job_once(store: Store) -> None:
    alice = await _user(store, "alice")
    workers = [await _worker(store, f"w{i}", f"{i:x}" * 64) for i in range(4)]
    jobs = {await _submit(store, alice) for _ in range(6)}
    popped = await asyncio.gather(
        *[store.image_jobs.pop(w, ["m"], 64 * 64, 10) for w in workers for _ in range(3)]
    )
    leased = [job.id for job in popped if job is not None]
    assert sorted(leased) == sorted(jobs)
