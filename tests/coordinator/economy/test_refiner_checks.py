"""Spot checks of workers with an SDXL refiner (README "Spot checks and refiners"): a check
goes only to a checker whose refiner setup makes the same pixels for the job, and a worker
whose refiner no trusted worker has is paid as an unsigned one, never convicted. Fake
signed workers over real HTTP on a real SQLite coordinator; their engine reports say what
they run."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.economy.check_refiner import UNREPORTED, check_refiner, refiner_setup_of
from coordinator.http.state import CONFIG
from protocol.loras import LoraSpec
from protocol.params import ImageParams
from protocol.refiner import NO_REFINER
from tests.clock import MockClock, reaper_round
from tests.conftest import LiveApp, start_app
from tests.fakes import CAPS, FakeWorker, job_pngs, register_accounts

# 256x256, 20 steps: 3 kudos, of which an untrusted worker gets 2 now and 1 held
MEDIUM: dict[str, Any] = {"prompt": "a red fox", "width": 256, "height": 256, "steps": 20}
REFINER = "ab" * 32
SDXL: dict[str, Any] = {"engine": "diffusers", "device": "cpu", "baseline": "sdxl"}
REFINED: dict[str, Any] = {**SDXL, "refiner_sha256": REFINER, "refiner_switch": 0.8}


@pytest.fixture
def clock() -> MockClock:
    return MockClock()


@pytest.fixture
async def checked(
    coordinator_config: CoordinatorConfig, clock: MockClock
) -> AsyncIterator[LiveApp]:
    """Every untrusted result is spot-checked; the operator's workers are trusted."""
    config = dataclasses.replace(
        coordinator_config,
        spot_check_rate=1.0,
        spot_check_min_rate=1.0,
        trusted_accounts=frozenset({"operator"}),
        max_pixel_steps_per_second=float("inf"),
        verify_distinct_ip=False,
    )
    runner, app = await start_app(config, clock)
    try:
        yield app
    finally:
        await runner.cleanup()


async def _serve_original(worker: FakeWorker, requester: AsyncClient, seed: int) -> Any:
    created = await requester.submit_image(ImageParams(**MEDIUM, seed=seed))
    job = await worker.link.pop(CAPS, wait=5)
    assert job is not None and job.id == created.id
    return await worker.link.submit(job, job.params.seeds(), job_pngs(job))


async def test_a_refined_jobs_check_goes_only_to_a_checker_of_the_same_refiner(
    checked: LiveApp,
) -> None:
    operator, painter_key, plain_key, alice = await register_accounts(
        checked.url, "operator", "painter", "plain", "alice"
    )
    async with (
        FakeWorker(checked.url, "base-only", operator) as base_only,
        FakeWorker(checked.url, "other-switch", operator) as other_switch,
        FakeWorker(checked.url, "refining", operator) as refining,
        FakeWorker(checked.url, "painter", painter_key) as painter,
        FakeWorker(checked.url, "plain", plain_key) as plain,
        AsyncClient(checked.url, alice) as requester,
        AsyncClient(checked.url, painter_key) as painter_owner,
        AsyncClient(checked.url, plain_key) as plain_owner,
    ):
        await base_only.link.report_engine(SDXL)
        await other_switch.link.report_engine({**REFINED, "refiner_switch": 0.7})
        await refining.link.report_engine(REFINED)
        await painter.link.report_engine(REFINED)
        await plain.link.report_engine(SDXL)

        # the painter's txt2img job was refined: only the same refiner and switch check it
        accepted = await _serve_original(painter, requester, 11)
        assert (accepted.kudos_earned, accepted.kudos_held) == (2, 1)
        assert await base_only.link.pop(CAPS, wait=0) is None
        assert await other_switch.link.pop(CAPS, wait=0) is None
        check = await refining.link.pop(CAPS, wait=0)
        assert check is not None and check.params.seed == 11
        await refining.link.submit(check, check.params.seeds(), job_pngs(check))
        assert (await painter_owner.me()).pending == 0

        # a plain SDXL worker's job would be refined by a refiner checker: not theirs
        await _serve_original(plain, requester, 12)
        assert await refining.link.pop(CAPS, wait=0) is None
        assert await other_switch.link.pop(CAPS, wait=0) is None
        check = await base_only.link.pop(CAPS, wait=0)
        assert check is not None and check.params.seed == 12
        await base_only.link.submit(check, check.params.seeds(), job_pngs(check))
        assert (await plain_owner.me()).pending == 0
        for worker in (painter, plain):
            assert worker.link.worker_id is not None
            record = await requester.worker(worker.link.worker_id)
            assert (record.checks_passed, record.checks_failed) == (1, 0)


async def test_a_refiner_no_trusted_worker_has_is_paid_as_unsigned_not_convicted(
    checked: LiveApp, clock: MockClock
) -> None:
    operator, painter_key, alice = await register_accounts(
        checked.url, "operator", "painter", "alice"
    )
    async with (
        FakeWorker(checked.url, "base-only", operator) as base_only,
        FakeWorker(checked.url, "painter", painter_key) as painter,
        AsyncClient(checked.url, alice) as requester,
        AsyncClient(checked.url, painter_key) as painter_owner,
    ):
        await base_only.link.report_engine(SDXL)
        await painter.link.report_engine(REFINED)
        before = await painter_owner.me()
        accepted = await _serve_original(painter, requester, 21)
        # no check the base-only worker would get wrong; the whole price is held for
        # dispute, then paid, as an AI Horde worker's
        assert (accepted.kudos_earned, accepted.kudos_held) == (0, 3)
        assert await base_only.link.pop(CAPS, wait=0) is None
        assert painter.link.worker_id is not None
        record = await requester.worker(painter.link.worker_id)
        assert (record.checks_failed, record.suspicion, record.paused) == (0, 0, False)
        assert (await painter_owner.me()).pending == 3
        await reaper_round(clock, checked.app[CONFIG].horde_hold_seconds + 1)
        after = await painter_owner.me()
        assert (after.pending, after.kudos - before.kudos) == (0, 3)


def test_the_checker_a_job_needs_follows_the_engines_rule() -> None:
    txt2img = ImageParams(**MEDIUM, seed=1)
    with_lora = ImageParams(**MEDIUM, seed=1, loras=[LoraSpec(name="ink")])
    refined, sdxl = json.dumps(REFINED), json.dumps(SDXL)
    setup = refiner_setup_of(refined)
    assert setup != NO_REFINER and setup != refiner_setup_of(
        json.dumps({**REFINED, "refiner_switch": 0.7})
    )
    assert check_refiner(refined, txt2img) == setup
    assert check_refiner(sdxl, txt2img) == NO_REFINER == refiner_setup_of(sdxl)
    # the refiner does not take it, or the engine cannot have one: any checker
    assert check_refiner(refined, with_lora) is None
    assert check_refiner(json.dumps({**SDXL, "baseline": "sd1"}), txt2img) is None
    assert check_refiner(None, txt2img) is None
    assert refiner_setup_of(None) == UNREPORTED
