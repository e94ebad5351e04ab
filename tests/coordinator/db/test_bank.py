"""A randomized test in the spirit of Jepsen's bank test.

Two real `idlegrid coordinator` processes share one database (SQLite file or PostgreSQL).
Requesters submit, cancel, share and rate; fake workers (the real worker link) pop,
report progress, complete, fail or silently abandon jobs; users transfer kudos with
idempotency keys and replay them. A nemesis SIGKILLs a coordinator every few seconds and
starts a new one. Operations cut off by a kill are "indeterminate": they may or may not
have happened, and the checks must hold either way.

Then, after the queue drains, the books must be right: every ledger entry sums to zero;
kudos come into being only through grant-like entries, and transferable ones only through
the operator's mint (grants stay grants through every job); no balance is below its floor;
every job reserved once and is settled or refunded exactly once; nothing acknowledged
was lost; every transfer key moved kudos once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import func, select

from client.errors import ApiError, ClientError
from client.sdk import AsyncClient
from coordinator.config import DEFAULT_RATE_LIMITS, CoordinatorConfig
from coordinator.db.schema import accounts, jobs, ledger_entries, postings, ratings, results
from coordinator.economy.payments import GRANT_REASONS
from coordinator.store import Store
from protocol.params import ImageParams
from tests.fakes import CAPS, FakeWorker, job_pngs
from tests.procs import Proc
from worker.errors import CoordinatorRejected, CoordinatorUnavailable, LeaseLost

pytestmark = pytest.mark.slow

CHAOS_SECONDS = 35.0
DRAIN_SECONDS = 60.0
USERS = 4
WORKERS = 3
GRANT = 100
MINT = 50  # transferable kudos the operator gives each user (grants are not transferable)
LEASE = 2.0
LIMITS = [f"--rate-limit={s}=10000/10000,10000/10000" for s in DEFAULT_RATE_LIMITS]
UNSURE = (ClientError, aiohttp.ClientError, TimeoutError, CoordinatorUnavailable)


@dataclass
class History:
    submitted: dict[str, str] = field(default_factory=dict)  # job -> user
    cancelled: set[str] = field(default_factory=set)
    completed: dict[str, str] = field(default_factory=dict)  # job -> worker id
    transfers: dict[tuple[str, str], tuple[int, str, int]] = field(default_factory=dict)
    rewarded_ratings: int = 0
    indeterminate: Counter[str] = field(default_factory=Counter)
    done: Counter[str] = field(default_factory=Counter)


class Cluster:
    """Coordinator processes on one database; the nemesis kills and replaces them. With
    `processes` > 1 each is a `--processes N` parent, killed with its children."""

    def __init__(self, tmp: Path, database_url: str, processes: int = 1) -> None:
        self.tmp = tmp
        self.database_url = database_url
        self.processes = processes
        self.procs: list[Proc] = []
        self.urls: dict[int, str] = {}
        self.started = 0

    def start(self) -> None:
        self.started += 1
        proc = Proc(
            [
                "coordinator",
                "--port",
                "0",
                "--data-dir",
                str(self.tmp / "data"),
                "--database-url",
                self.database_url,
                "--lease-timeout",
                str(LEASE),
                "--grant",
                str(GRANT),
                "--spot-check-rate",
                "0",
                # the chaos workers give jobs back on purpose, often several in a row
                "--faulted-run",
                "1000",
                # fake workers answer at once: far beyond any GPU, and not what is tested here
                "--max-pixel-steps-per-second",
                "inf",
                "--processes",
                str(self.processes),
                *LIMITS,
            ],
            self.tmp / f"coordinator-{self.started}.log",
        )
        url = proc.wait_for(r"listening on (http://\S+)", 60).group(1)
        self.procs.append(proc)
        self.urls[proc.pid] = url

    def url(self, rng: random.Random) -> str:
        return rng.choice(sorted(self.urls.values()))

    def kill_one(self, rng: random.Random) -> None:
        live = [p for p in self.procs if p.pid in self.urls]
        victim = rng.choice(live)
        del self.urls[victim.pid]
        victim.kill(signal.SIGKILL)
        victim.stop()

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()


def _params(rng: random.Random) -> ImageParams:
    return ImageParams(
        prompt="bank",
        width=64 * rng.randint(1, 4),
        height=64 * rng.randint(1, 4),
        steps=rng.randint(1, 30),
        n=rng.randint(1, 2),
        seed=rng.randint(0, 1000),
        sampler=rng.choice(["Euler a", "Heun"]),
    )


async def _requester(
    cluster: Cluster, keys: dict[str, str], history: History, rng: random.Random, stop: float
) -> None:
    names = sorted(keys)
    sent_keys: list[tuple[str, str, str, int]] = []  # (sender, key, to, amount)
    while time.monotonic() < stop:
        user = rng.choice(names)
        op = rng.choices(
            ["submit", "cancel", "rate", "share", "transfer", "replay"], [5, 1, 2, 1, 2, 1]
        )[0]
        mine = [j for j, u in history.submitted.items() if u == user]
        try:
            # a killed coordinator comes back on another port: the SDK's retry of a submit
            # whose answer was lost would wait for the old one (for wait_timeout)
            async with AsyncClient(
                cluster.url(rng), keys[user], timeout=10, wait_timeout=2
            ) as grid:
                if op == "submit":
                    created = await grid.submit_image(_params(rng))
                    history.submitted[created.id] = user
                elif op == "cancel" and mine:
                    job = rng.choice(mine)
                    await grid.cancel(job)
                    history.cancelled.add(job)
                elif op in ("rate", "share") and mine:
                    job = rng.choice(mine)
                    if op == "share":
                        await grid.share(job)
                    else:
                        status = await grid.job(job)
                        if status.state == "done":
                            recorded = await grid.rate(
                                job, rng.randrange(status.n), rng.randint(1, 10)
                            )
                            history.rewarded_ratings += recorded.kudos_earned
                elif op == "transfer":
                    to = rng.choice([n for n in names if n != user])
                    key, amount = str(uuid.uuid4()), rng.randint(1, 5)
                    done = await grid.transfer(to, amount, key)
                    history.transfers[(user, key)] = (done.id, to, amount)
                    sent_keys.append((user, key, to, amount))
                elif op == "replay" and sent_keys:
                    sender, key, to, amount = rng.choice(sent_keys)
                    async with AsyncClient(cluster.url(rng), keys[sender], timeout=10) as again:
                        if rng.random() < 0.8:
                            replay = await again.transfer(to, amount, key)
                            first = history.transfers.get((sender, key))
                            assert first is None or replay.id == first[0], "replay moved kudos"
                            history.transfers[(sender, key)] = (replay.id, to, amount)
                        else:
                            with pytest.raises(ApiError) as refused:
                                await again.transfer(to, amount + 1, key)
                            assert refused.value.status == 409
            history.done[op] += 1
        except ApiError as exc:
            if exc.status >= 500 or exc.status == 429:
                history.indeterminate[f"{op}: HTTP {exc.status}"] += 1
            # 402 (no kudos), 404 (not done yet), 409 (already finished / rated) are answers
        except UNSURE as exc:
            history.indeterminate[f"{op}: {type(exc).__name__}"] += 1
        await asyncio.sleep(rng.random() * 0.02)


async def _worker(
    cluster: Cluster, worker: FakeWorker, history: History, rng: random.Random, stop: float
) -> None:
    while time.monotonic() < stop:
        worker.link.base_url = cluster.url(rng)
        try:
            job = await worker.link.pop(CAPS, wait=0.5)
            if job is None:
                continue
            if rng.random() < 0.5:
                await worker.link.progress(job.id, 0, 1, job.params.steps)
            roll = rng.random()
            if roll < 0.1:
                await asyncio.sleep(LEASE * 1.5)  # abandon: the lease runs out
                with contextlib.suppress(LeaseLost):
                    await worker.link.submit(job, job.params.seeds(), job_pngs(job))
                    assert worker.link.worker_id is not None
                    history.completed[job.id] = worker.link.worker_id
            elif roll < 0.3:
                await worker.link.fail(job.id, "chaos")
            else:
                worker.link.base_url = cluster.url(rng)
                seeds = job.params.seeds()
                await worker.link.submit(job, seeds, job_pngs(job))
                assert worker.link.worker_id is not None
                history.completed[job.id] = worker.link.worker_id
            history.done["work"] += 1
        except LeaseLost:
            history.done["lease lost"] += 1  # cancelled or expired meanwhile: a fine answer
        except (
            CoordinatorUnavailable,
            CoordinatorRejected,
            aiohttp.ClientError,
            TimeoutError,
        ) as exc:
            history.indeterminate[f"work: {type(exc).__name__}"] += 1
            await asyncio.sleep(0.1)


async def _nemesis(cluster: Cluster, rng: random.Random, stop: float) -> int:
    # A `--processes 2` parent takes seconds to start on a loaded 2-core machine; the pause
    # between kills is short so that several kills fit in the chaos window regardless.
    kills = 0
    while time.monotonic() < stop - 4:
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        await asyncio.to_thread(cluster.kill_one, rng)
        kills += 1
        await asyncio.to_thread(cluster.start)
    return kills


async def _drain(
    cluster: Cluster, workers: list[FakeWorker], store: Store, rng: random.Random
) -> None:
    deadline = time.monotonic() + DRAIN_SECONDS
    open_jobs = 0
    while time.monotonic() < deadline:
        async with store.db.engine.begin() as conn:
            open_jobs = (
                await conn.execute(
                    select(func.count())
                    .select_from(jobs)
                    .where(jobs.c.state.in_(("queued", "leased")))
                )
            ).scalar_one()
        if not open_jobs:
            return
        for worker in workers:
            worker.link.base_url = cluster.url(rng)
            with contextlib.suppress(LeaseLost, CoordinatorUnavailable):
                job = await worker.link.pop(CAPS, wait=0.2)
                if job is not None:
                    await worker.link.submit(job, job.params.seeds(), job_pngs(job))
    async with store.db.engine.begin() as conn:
        stuck = (
            await conn.execute(
                select(jobs.c.id, jobs.c.state, jobs.c.pixels, jobs.c.steps, jobs.c.lease_deadline)
                .where(jobs.c.state.in_(("queued", "leased")))
                .limit(5)
            )
        ).all()
    raise AssertionError(
        f"the queue did not drain: {open_jobs} open, e.g. {stuck}; now {time.time()}"
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("database_url", "processes"),
    [
        pytest.param("sqlite", 1, id="sqlite-1-process"),
        pytest.param("postgres", 1, marks=pytest.mark.postgres, id="postgres-1-process"),
        # --processes N needs PostgreSQL
        pytest.param("postgres", 2, marks=pytest.mark.postgres, id="postgres-2-processes"),
    ],
    indirect=["database_url"],
)
async def test_bank_invariants_hold_under_chaos(
    tmp_path: Path, database_url: str, processes: int
) -> None:
    rng = random.Random(int(time.time()))
    cluster = Cluster(tmp_path, database_url, processes)
    history = History()
    workers: list[FakeWorker] = []
    try:
        await asyncio.to_thread(cluster.start)
        await asyncio.to_thread(cluster.start)
        keys: dict[str, str] = {}
        async with AsyncClient(cluster.url(rng)) as anon:
            for i in range(USERS):
                keys[f"user{i}"] = (await anon.register(f"user{i}")).api_key
        config = CoordinatorConfig(data_dir=tmp_path / "data", database_url=database_url)
        operator = await Store.open(config)
        try:
            for name in keys:
                await operator.ledger.mint(name, MINT)
        finally:
            await operator.aclose()
        for i in range(WORKERS):
            owner = keys[f"user{i}"] if i < 2 else None  # some workers earn for users
            worker = FakeWorker(cluster.url(rng), f"bank{i}", owner)
            await worker.link.register()
            workers.append(worker)
        stop = time.monotonic() + CHAOS_SECONDS
        async with asyncio.TaskGroup() as group:
            kills = group.create_task(_nemesis(cluster, random.Random(rng.random()), stop))
            for _ in range(6):
                group.create_task(
                    _requester(cluster, keys, history, random.Random(rng.random()), stop)
                )
            for worker in workers:
                group.create_task(
                    _worker(cluster, worker, history, random.Random(rng.random()), stop)
                )
        store = await Store.open(config)
        try:
            await _drain(cluster, workers, store, rng)
            await _check(store, history)
        finally:
            await store.aclose()
        assert kills.result() >= 3, kills.result()
        assert history.done["submit"] > 100 and history.done["work"] > 50, history.done
        assert history.done["transfer"] > 10 and len(history.cancelled) > 3, history.done
        print(
            f"\nbank: {dict(history.done)}; kills {kills.result()}; "
            f"indeterminate {dict(history.indeterminate)}"
        )
    finally:
        for worker in workers:
            await worker.link.aclose()
        await asyncio.to_thread(cluster.close)


async def _check(store: Store, history: History) -> None:
    audit = await store.ledger.audit()
    assert audit["unbalanced_entries"] == 0, audit
    assert audit["sum"] == 0, audit
    # the balance rows (what spending checks read) agree with the ledger, account by account
    assert audit["balance_rows_off"] == 0, audit
    # unspent grants (never transferable) lie between 0 and each balance
    assert audit["grants_off"] == 0, audit
    # no kudos from nothing: the transferable ones are exactly what the operator minted,
    # however the jobs that grants funded were paid, refunded, held and released
    assert audit["transferable"] == audit["minted"] == MINT * USERS, audit
    async with store.db.engine.begin() as conn:
        grants_id = store.db.system_account("system:grants")
        escrow_id = store.db.system_account("system:escrow")
        # kudos appear or vanish only through grant-like entries
        touching_grants = (
            await conn.execute(
                select(ledger_entries.c.reason, func.sum(postings.c.amount))
                .select_from(postings.join(ledger_entries))
                .where(postings.c.account_id == grants_id)
                .group_by(ledger_entries.c.reason)
            )
        ).all()
        assert {reason for reason, _ in touching_grants} <= GRANT_REASONS, touching_grants
        created = dict(touching_grants)
        user_count = (
            await conn.execute(
                select(func.count()).select_from(accounts).where(accounts.c.kind == "user")
            )
        ).scalar_one()
        assert -created.get("grant", 0) == GRANT * user_count
        assert -created.get("mint", 0) == MINT * user_count
        rating_rewards = -created.get("rating", 0)
        assert rating_rewards >= history.rewarded_ratings
        rating_rows = (await conn.execute(select(func.count()).select_from(ratings))).scalar_one()
        assert rating_rewards <= rating_rows
        supply = (
            await conn.execute(
                select(func.coalesce(func.sum(postings.c.amount), 0)).where(
                    postings.c.account_id != grants_id
                )
            )
        ).scalar_one()
        assert supply == -sum(created.values())
        # no balance below its floor
        below = (
            await conn.execute(
                select(
                    accounts.c.name, accounts.c.floor, func.coalesce(func.sum(postings.c.amount), 0)
                )
                .select_from(accounts.outerjoin(postings, postings.c.account_id == accounts.c.id))
                .group_by(accounts.c.id, accounts.c.name, accounts.c.floor)
            )
        ).all()
        assert all(total >= floor for _, floor, total in below), below
        # every job reserved once, then settled or refunded exactly once
        per_job: defaultdict[str, Counter[str]] = defaultdict(Counter)
        for job_id, reason in (
            await conn.execute(
                select(ledger_entries.c.job_id, ledger_entries.c.reason).where(
                    ledger_entries.c.job_id.is_not(None)
                )
            )
        ).all():
            per_job[job_id][reason] += 1
        states = dict((await conn.execute(select(jobs.c.id, jobs.c.state))).all())
        # a job holds grants only while its reservation does: refunds gave them back
        grant_spent = (
            await conn.execute(
                select(jobs.c.id, jobs.c.state, jobs.c.cost, jobs.c.grant_spent).where(
                    (jobs.c.grant_spent < 0)
                    | (jobs.c.grant_spent > jobs.c.cost)
                    | (jobs.c.state.in_(("failed", "cancelled")) & (jobs.c.grant_spent != 0))
                )
            )
        ).all()
        assert not grant_spent, grant_spent
        escrow = (
            await conn.execute(
                select(func.coalesce(func.sum(postings.c.amount), 0)).where(
                    postings.c.account_id == escrow_id
                )
            )
        ).scalar_one()
        done_with_results = set(
            (await conn.execute(select(results.c.job_id).distinct())).scalars().all()
        )
    assert escrow == 0
    for job_id, state in states.items():
        counts = per_job[job_id]
        assert counts["reserve"] == 1, (job_id, counts)
        if state == "done":
            assert (counts["settle"], counts["refund"]) == (1, 0), (job_id, counts)
            assert job_id in done_with_results
        else:
            assert state in ("failed", "cancelled"), (job_id, state)
            assert (counts["settle"], counts["refund"]) == (0, 1), (job_id, counts)
    # nothing acknowledged was lost
    assert set(history.submitted) <= set(states)
    for job_id in history.cancelled:
        assert states[job_id] == "cancelled"
    for job_id in history.completed:
        assert states[job_id] == "done"
    # each acknowledged transfer key moved kudos exactly once
    async with store.db.engine.begin() as conn:
        keyed = Counter(
            (
                await conn.execute(
                    select(ledger_entries.c.idempotency_key).where(
                        ledger_entries.c.reason == "transfer"
                    )
                )
            )
            .scalars()
            .all()
        )
    assert all(count == 1 for count in keyed.values())
    names = {name: i for i, name in enumerate(sorted({s for s, _ in history.transfers}))}
    assert names is not None
    async with store.db.engine.begin() as conn:
        ids = dict((await conn.execute(select(accounts.c.name, accounts.c.id))).all())
    for (sender, key), (entry_id, _to, _amount) in history.transfers.items():
        assert keyed[f"transfer:{ids[sender]}:{key}"] == 1
        assert entry_id > 0
