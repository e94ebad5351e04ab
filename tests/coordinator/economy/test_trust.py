"""Trust: held earnings, spot checks by trusted workers, a quorum of two to catch a cheater,
cheaters caught and paused, impossible speeds, and the rule of text spot checks (the text
ones over HTTP: tests/adversarial/test_text_earnings.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from client.errors import ApiError
from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.economy.text_checks import texts_agree
from coordinator.files import LocalFiles
from coordinator.http.state import FILES
from protocol.params import ImageParams
from protocol.signing import sha256_hex
from tests.conftest import LiveApp, start_app
from tests.fakes import CAPS, FakeWorker, job_pngs, png, register_accounts
from worker.errors import CoordinatorRejected

# 256x256, 20 steps: 3 kudos, of which an untrusted worker gets 2 now and 1 held
MEDIUM: dict[str, Any] = {"prompt": "a blue cone", "width": 256, "height": 256, "steps": 20}
ENGINE = {"engine": "diffusers", "versions": {"torch": "2.13.0"}, "device": "cpu"}


@pytest.fixture
async def checked(coordinator_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    """Every untrusted result is spot-checked; the operator's and the auditor's workers are
    trusted. Fake workers answer at once, so no speed checks; all are on 127.0.0.1."""
    config = dataclasses.replace(
        coordinator_config,
        spot_check_rate=1.0,
        spot_check_min_rate=1.0,
        trusted_accounts=frozenset({"operator", "auditor"}),
        pause_after_suspicions=2,
        trust_after_checks=2,
        max_pixel_steps_per_second=float("inf"),
        verify_distinct_ip=False,
    )
    runner, app = await start_app(config)
    try:
        yield app
    finally:
        await runner.cleanup()


async def _serve(worker: FakeWorker, *, wrong: bool = False, expect_check: bool = False) -> str:
    job = await worker.link.pop(CAPS, wait=5)
    assert job is not None
    assert expect_check == (job.params.prompt == MEDIUM["prompt"] and expect_check)
    seeds = job.params.seeds()
    await worker.link.submit(job, seeds, job_pngs(job, offset=7 if wrong else 0))
    return job.id


async def test_a_cheating_worker_is_caught_by_spot_checks_and_paused(checked: LiveApp) -> None:
    operator, auditor, mallory, alice = await register_accounts(
        checked.url, "operator", "auditor", "mallory", "alice"
    )
    async with (
        FakeWorker(checked.url, "referee", operator) as referee,
        FakeWorker(checked.url, "second", auditor) as second,
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
            # one "disagree" is not final: held until a second, independent verifier agrees
            assert (await owner.me()).pending == 1
            assert await requester.image(created.id, 0) == png(99, 256, 256)
            assert await referee.link.pop(CAPS, wait=0) is None
            again = await second.link.pop(CAPS, wait=5)
            assert again is not None and again.params == served.params
            await second.link.submit(again, [40 + round_], [png(40 + round_, 256, 256)])
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
    balances = await checked.store.ledger.balances()
    assert balances[f"pending:{cheater.link.worker_id}"] == 0
    audit = await checked.store.ledger.audit()
    assert audit["unbalanced_entries"] == 0 and audit["sum"] == 0


async def test_an_honest_worker_earns_trust_and_its_held_kudos(checked: LiveApp) -> None:
    operator, newbie_key, alice = await register_accounts(
        checked.url, "operator", "newbie", "alice"
    )
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
    runner, app = await start_app(dataclasses.replace(config, verify_distinct_ip=False))
    try:
        operator, alice = await register_accounts(app.url, "operator", "alice")
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


async def test_a_disputed_jobs_pay_stays_held_until_the_second_check(checked: LiveApp) -> None:
    """Another job's passed check releases only what is not in dispute."""
    operator, auditor, newbie_key, alice = await register_accounts(
        checked.url, "operator", "auditor", "newbie", "alice"
    )
    async with (
        FakeWorker(checked.url, "referee", operator) as referee,
        FakeWorker(checked.url, "second", auditor) as second,
        FakeWorker(checked.url, "newbie", newbie_key) as newbie,
        AsyncClient(checked.url, alice) as requester,
        AsyncClient(checked.url, newbie_key) as owner,
    ):
        for seed in (1, 2):
            await requester.submit_image(ImageParams(**MEDIUM, seed=seed))
            await _serve(newbie)
        assert (await owner.me()).pending == 2
        # the referee wrongly disagrees on the first job and rightly agrees on the second
        first = await referee.link.pop(CAPS, wait=5)
        other = await referee.link.pop(CAPS, wait=5)
        assert first is not None and other is not None
        await referee.link.submit(first, first.params.seeds(), job_pngs(first, offset=100))
        await referee.link.submit(other, other.params.seeds(), job_pngs(other))
        me = await owner.me()
        assert (me.pending, me.earned) == (1, 5)  # the disputed job's kudo waits
        decider = await second.link.pop(CAPS, wait=5)
        assert decider is not None and decider.params == first.params
        await second.link.submit(decider, decider.params.seeds(), job_pngs(decider))
        me = await owner.me()
        assert (me.pending, me.earned) == (0, 6)
        assert newbie.link.worker_id is not None and referee.link.worker_id is not None
        assert (await requester.worker(newbie.link.worker_id)).suspicion == 0
        outvoted = await requester.worker(referee.link.worker_id)
        assert outvoted.suspicion == 1 and not outvoted.trusted


async def test_a_verifiers_unreadable_image_voids_its_check(checked: LiveApp) -> None:
    """The verifier's stored image turns out undecodable: the suspicion is the verifier's,
    it earns nothing, and the job is checked again by someone else."""
    operator, auditor, newbie_key, alice = await register_accounts(
        checked.url, "operator", "auditor", "newbie", "alice"
    )
    async with (
        FakeWorker(checked.url, "referee", operator) as referee,
        FakeWorker(checked.url, "second", auditor) as second,
        FakeWorker(checked.url, "newbie", newbie_key) as newbie,
        AsyncClient(checked.url, alice) as requester,
        AsyncClient(checked.url, newbie_key) as owner,
    ):
        await requester.submit_image(ImageParams(**MEDIUM, seed=4))
        await _serve(newbie)
        check = await referee.link.pop(CAPS, wait=5)
        assert check is not None
        mine = png(4, 256, 256, compress_level=9)  # same picture, other bytes
        await referee.link.upload_image(check, 0, 4, mine)
        files = checked.app[FILES]
        assert isinstance(files, LocalFiles)
        files.path(sha256_hex(mine)).write_bytes(mine[:100])
        voided = await referee.link.finish(
            check, [referee.link.signed_image(check, 0, 4, sha256_hex(mine))]
        )
        assert (voided.kudos_earned, voided.kudos_held) == (0, 0)
        assert referee.link.worker_id is not None and newbie.link.worker_id is not None
        assert (await requester.worker(referee.link.worker_id)).suspicion == 1
        assert (await owner.me()).pending == 1
        again = await second.link.pop(CAPS, wait=5)
        assert again is not None and again.params == check.params
        await second.link.submit(again, [4], [png(4, 256, 256)])
        assert (await owner.me()).pending == 0
        assert (await requester.worker(newbie.link.worker_id)).checks_passed == 1


def test_a_text_check_agrees_on_equal_texts_or_the_agreed_prefix(tmp_path: Path) -> None:
    config = CoordinatorConfig(data_dir=tmp_path, text_check_prefix_chars=8)
    assert texts_agree(config, "same text", "same text")
    # floating-point drift may flip a late near-tie: equal first 8 characters agree
    assert texts_agree(config, "12345678 and then", "12345678 but now")
    assert not texts_agree(config, "1234567x", "12345678")
    assert not texts_agree(config, "short", "short but longer")  # under 8: must be equal
    exact = dataclasses.replace(config, text_check_prefix_chars=0)
    assert not texts_agree(exact, "12345678 and then", "12345678 but now")
    assert texts_agree(exact, "", "")
