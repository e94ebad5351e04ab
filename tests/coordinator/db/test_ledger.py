"""The ledger invariant: entries balance, supply moves only by grants, nothing paid twice."""

from __future__ import annotations

import contextlib
import random

import pytest

from coordinator.db.ledger import post_entry
from coordinator.errors import Conflict, InsufficientKudos, WorkerPaused
from coordinator.store import ImageJob, ResultRecord, Store, Worker
from protocol.cost import image_cost
from protocol.params import ImageParams


async def test_an_unbalanced_entry_is_refused(store: Store) -> None:
    account, _ = await store.accounts.create_account("alice")
    async with store.db.engine.begin() as conn:
        with pytest.raises(ValueError, match="does not balance"):
            await post_entry(conn, reason="bug", key="k1", moves=[(account.id, 5)])
    async with store.db.engine.begin() as conn:
        with pytest.raises(Conflict, match="already written"):
            await post_entry(
                conn, reason="grant", key=f"grant:new-account:{account.id}", moves=[(account.id, 0)]
            )
    assert await store.ledger.balance(account.id) == 100


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_operations_keep_the_books(store: Store, seed: int) -> None:
    rng = random.Random(seed)
    users = [(await store.accounts.create_account(f"user{i}"))[0] for i in range(4)]
    workers: list[Worker] = [
        (await store.workers.register_worker(f"w{i}", f"{i + 10:x}" * 32, None))[0]
        for i in range(3)
    ]
    leased: dict[str, tuple[Worker, ImageJob]] = {}
    paid: dict[str, int] = {}
    for _ in range(120):
        op = rng.choice(["submit", "submit", "pop", "complete", "fail", "progress"])
        if op == "submit":
            user = rng.choice(users)
            params = ImageParams(
                prompt="x",
                width=64 * rng.randint(1, 8),
                height=64,
                steps=rng.randint(1, 50),
                seed=1,
            )
            with contextlib.suppress(InsufficientKudos):
                await store.image_jobs.create(user, params, image_cost(params))
        elif op == "pop":
            worker = rng.choice(workers)
            # three give-backs in a row pause a worker (--faulted-run): a fine outcome here
            with contextlib.suppress(WorkerPaused):
                job = await store.image_jobs.pop(worker, ["m"], 10**7, 150)
                if job is not None:
                    leased[job.id] = (worker, job)
        elif leased:
            job_id = rng.choice(sorted(leased))
            worker, job = leased[job_id]
            other = rng.choice(workers)  # sometimes the wrong worker tries
            try:
                if op == "complete":
                    await store.image_jobs.complete(
                        other, job, [ResultRecord(0, 1, "0" * 64, "0" * 128)]
                    )
                    paid[job_id] = paid.get(job_id, 0) + 1
                    del leased[job_id]
                elif op == "fail":
                    await store.image_jobs.fail(other, job_id, "boom")
                    del leased[job_id]
                else:
                    await store.image_jobs.report_progress(other, job_id, 0, 1, 2)
            except Conflict:
                assert other is not worker
    audit = await store.ledger.audit()
    assert audit["unbalanced_entries"] == 0
    assert audit["sum"] == 0
    # unspent grants stay between 0 and the balance through reserves and refunds
    assert (audit["balance_rows_off"], audit["grants_off"]) == (0, 0)
    balances = await store.ledger.balances()
    grants = -balances["system:grants"]
    assert grants == 100 * len(users)  # supply changed only by the recorded grants
    assert all(balances[u.name] >= 0 for u in users)  # never below the floor
    assert all(count == 1 for count in paid.values())
    assert balances["system:escrow"] >= 0
