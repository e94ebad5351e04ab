"""Trust: held earnings, spot checks by trusted workers, cheaters caught and paused."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from client.errors import ApiError
from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.params import ImageParams
from tests.conftest import LiveApp, start_app
from tests.fakes import CAPS, FakeWorker, job_pngs, png
from worker.errors import CoordinatorRejected

# 256x256, 20 steps: 3 kudos, of which an untrusted worker gets 2 now and 1 held
MEDIUM = {"prompt": "a blue cone", "width": 256, "height": 256, "steps": 20}
ENGINE = {"engine": "diffusers", "versions": {"torch": "2.13.0"}, "device": "cpu"}


@pytest.fixture
async def checked(coordinator_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    """Every untrusted result is spot-checked; the operator's workers are trusted."""
    config = dataclasses.replace(
        coordinator_config,
        spot_check_rate=1.0,
        spot_check_min_rate=1.0,
        trusted_accounts=frozenset({"operator"}),
        pause_after_suspicions=2,
        trust_after_checks=2,
    )
    runner, app = await start_app(config)
    try:
        yield app
    finally:
        await runner.cleanup()


async def _keys(url: str, *names: str) -> list[str]:
    async with AsyncClient(url) as anon:
        return [(await anon.register(name)).api_key for name in names]


async def _serve(worker: FakeWorker, *, wrong: bool = False, expect_check: bool = False) -> str:
    job = await worker.link.pop(CAPS, wait=5)
    assert job is not None
    assert expect_check == (job.params.prompt == MEDIUM["prompt"] and expect_check)
    seeds = job.params.seeds()
    await worker.link.submit(job, seeds, job_pngs(job, offset=7 if wrong else 0))
    return job.id


async def test_a_cheating_worker_is_caught_by_spot_checks_and_paused(checked: LiveApp) -> None:
    operator, mallory, alice = await _keys(checked.url, "operator", "mallory", "alice")
    async with (
        FakeWorker(checked.url, "referee", operator) as referee,
        FakeWorker(checked.url, "cheater", mallory) as cheater,
        AsyncClient(checked.url, alice) as requester,
        AsyncClient(checked.url, mallory) as owner,
    ):
        for worker in (referee, cheater):
            await worker.link.report_engine(ENGINE)
        assert cheater.link.worker_id is not None and referee.link.worker_id is not None
        assert (await requester.worker(referee.link.worker_id)).trusted
        for round_ in range(2):
            created = await requester.submit_image(ImageParams(**MEDIUM, seed=40 + round_))
            served = await cheater.link.pop(CAPS, wait=5)
            assert served is not None and served.id == created.id
            accepted = await cheater.link.submit(served, [40 + round_], [png(99, 256, 256)])
            assert (accepted.kudos_earned, accepted.kudos_held) == (2, 1)
            assert (await owner.me()).pending == 1
            # the trusted referee re-runs it (same seed and parameters) first
            check = await referee.link.pop(CAPS, wait=5)
            assert check is not None and check.id != created.id
            assert check.params == served.params
            verdict = await referee.link.submit(check, [40 + round_], [png(40 + round_, 256, 256)])
            assert verdict.kudos_earned == 3  # the referee is paid for the re-run
            # the requester now gets the trusted worker's image
            assert await requester.image(created.id, 0) == png(40 + round_, 256, 256)
            me = await owner.me()
            assert (me.pending, me.earned) == (0, 2 * (round_ + 1))
        record = await requester.worker(cheater.link.worker_id)
        assert record.paused and record.checks_failed == 2 and record.suspicion == 2
        assert record.pause_reason is not None and "spot check" in record.pause_reason
        await requester.submit_image(ImageParams(**MEDIUM, seed=1))
        with pytest.raises(CoordinatorRejected) as paused:
            await cheater.link.pop(CAPS, wait=0)
        assert paused.value.status == 403 and "paused" in str(paused.value)
        # nobody's job goes to it; the referee serves it instead
        assert (await referee.link.pop(CAPS, wait=5)) is not None
    balances = await checked.store.balances()
    assert balances[f"pending:{cheater.link.worker_id}"] == 0
    audit = await checked.store.ledger_audit()
    assert audit["unbalanced_entries"] == 0 and audit["sum"] == 0


async def test_an_honest_worker_earns_trust_and_its_held_kudos(checked: LiveApp) -> None:
    operator, newbie_key, alice = await _keys(checked.url, "operator", "newbie", "alice")
    async with (
        FakeWorker(checked.url, "referee", operator) as referee,
        FakeWorker(checked.url, "newbie", newbie_key) as newbie,
        AsyncClient(checked.url, alice) as requester,
        AsyncClient(checked.url, newbie_key) as owner,
    ):
        # no engine reports: images are compared within the cross-build tolerance
        assert newbie.link.worker_id is not None
        for seed in (1, 2):
            await requester.submit_image(ImageParams(**MEDIUM, seed=seed))
            await _serve(newbie)
            assert (await owner.me()).pending == 1
            await _serve(referee)
            assert (await owner.me()).pending == 0
        me = await owner.me()
        assert (me.earned, me.kudos) == (6, 106)
        record = await requester.worker(newbie.link.worker_id)
        assert record.trusted and record.checks_passed == 2 and not record.paused
        # trusted now: paid in full, nothing held, no more checks
        await requester.submit_image(ImageParams(**MEDIUM, seed=3))
        accepted_job = await newbie.link.pop(CAPS, wait=5)
        assert accepted_job is not None
        accepted = await newbie.link.submit(accepted_job, [3], [png(3, 256, 256)])
        assert (accepted.kudos_earned, accepted.kudos_held) == (3, 0)
        assert await referee.link.pop(CAPS, wait=0) is None


async def test_impossible_speed_adds_suspicion_and_forces_a_check(
    coordinator_config: CoordinatorConfig,
) -> None:
    config = dataclasses.replace(
        coordinator_config,
        spot_check_rate=0.0,
        spot_check_min_rate=0.0,
        max_pixel_steps_per_second=1000.0,
        trusted_accounts=frozenset({"operator"}),
    )
    runner, app = await start_app(config)
    try:
        operator, alice = await _keys(app.url, "operator", "alice")
        async with (
            FakeWorker(app.url, "sprinter") as sprinter,
            FakeWorker(app.url, "referee", operator) as referee,
            AsyncClient(app.url, alice) as requester,
        ):
            await requester.submit_image(ImageParams(**MEDIUM, seed=9))
            await _serve(sprinter)  # 1.3 million pixel-steps in milliseconds
            assert sprinter.link.worker_id is not None
            record = await requester.worker(sprinter.link.worker_id)
            assert record.suspicion == 1 and not record.paused
            check = await referee.link.pop(CAPS, wait=5)
            assert check is not None  # checked although the spot-check rate is 0
            with pytest.raises(ApiError):
                await requester.job(check.id)  # verification jobs are nobody's to see
    finally:
        await runner.cleanup()
