"""Hires fix and post-processing through the coordinator (issue 24 part B): AI Horde's
fields are taken and priced, jobs naming post-processors go only to workers holding them,
and the result must have the upscaled size."""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest

from client.errors import ApiError
from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.http.state import CONFIG
from protocol.cost import image_cost
from protocol.messages import PopRequest, PostProcessorName
from protocol.params import ImageParams
from protocol.postprocess import POST_PROCESSORS
from tests.conftest import LiveApp, start_app
from tests.coordinator.http.test_horde import Horde, request
from tests.coordinator.http.test_is_possible import possible
from tests.fakes import CAPS, FakeWorker, png, register_accounts
from worker.errors import CoordinatorRejected

EXTRAS = {
    "hires_fix": True,
    "hires_fix_denoising_strength": 0.4,
    "post_processing": ["RealESRGAN_x2plus", "GFPGAN"],
    "facefixer_strength": 0.5,
}


def test_the_wire_names_are_the_protocol_names() -> None:
    assert set(get_args(PostProcessorName)) == set(POST_PROCESSORS)
    assert PopRequest(models=["m"], max_pixels=4096, max_steps=1).post_processors == []


def test_prices_follow_ai_horde_multipliers() -> None:
    plain = ImageParams(prompt="x", steps=20)
    assert image_cost(plain) == 10
    # GFPGAN x1, an upscaler x1.05; the hires fix adds int(20 x 0.5) second-pass steps
    assert image_cost(plain.model_copy(update={"post_processing": ["GFPGAN"]})) == 10
    assert image_cost(plain.model_copy(update={"post_processing": ["NMKD_Siax"]})) == 11
    hires = ImageParams(prompt="x", steps=20, hires_fix=True, hires_fix_denoising_strength=0.5)
    assert image_cost(hires) == 15


async def test_a_v2_request_with_extras_is_priced_and_served_by_a_worker_holding_them(
    live: LiveApp,
) -> None:
    requester, donor = await register_accounts(live.url, "asker", "donor")
    horde = Horde(live.url, requester)
    created = await horde.ok("POST", "/v2/generate/async", request(**EXTRAS), 202)
    job = await live.store.image_jobs.get(created["id"])
    assert job is not None
    p = job.params
    assert (p.hires_fix, p.hires_fix_denoising_strength) == (True, 0.4)
    assert (p.post_processing, p.facefixer_strength) == (["RealESRGAN_x2plus", "GFPGAN"], 0.5)
    assert created["kudos"] == image_cost(p) and p.output_size == (128, 128)
    # the lease covers both passes of the hires fix: 4 + int(4 x 0.4) steps
    assert job.lease_seconds == live.app[CONFIG].lease_seconds(64 * 64, 5, 1)
    async with FakeWorker(live.url, "holder", donor) as worker:
        assert await worker.link.pop(CAPS, wait=0) is None
        only_gfpgan = CAPS.model_copy(update={"post_processors": ["GFPGAN"]})
        assert await worker.link.pop(only_gfpgan, wait=0) is None
        both = CAPS.model_copy(update={"post_processors": ["GFPGAN", "RealESRGAN_x2plus"]})
        leased = await worker.link.pop(both, wait=0)
        assert leased is not None and leased.id == job.id
        seed = leased.params.seeds()[0]
        # an image of the requested size is not the upscaled one
        with pytest.raises(CoordinatorRejected, match="128x128"):
            await worker.link.submit(leased, [seed], [png(1, 64, 64)])
        accepted = await worker.link.submit(leased, [seed], [png(1, 128, 128)])
    assert accepted.id == job.id


async def test_an_ai_horde_worker_gets_the_extras_unless_it_refuses_post_processing(
    live: LiveApp,
) -> None:
    requester, donor = await register_accounts(live.url, "asker", "bridge")
    await Horde(live.url, requester).ok("POST", "/v2/generate/async", request(**EXTRAS), 202)
    bridge = Horde(live.url, donor)
    pop = {"name": "bridge", "models": ["tiny"], "allow_post_processing": False}
    assert (await bridge.ok("POST", "/v2/generate/pop", pop))["id"] is None
    popped = await bridge.ok("POST", "/v2/generate/pop", {**pop, "allow_post_processing": True})
    payload = popped["payload"]
    assert payload["hires_fix"] is True and payload["hires_fix_denoising_strength"] == 0.4
    # face fixers first, as AI Horde's workers run them
    assert payload["post_processing"] == ["GFPGAN", "RealESRGAN_x2plus"]
    assert payload["facefixer_strength"] == 0.5


async def test_refused_post_processors_are_named(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "picky")
    got, answer = await Horde(live.url, key).call(
        "POST", "/v2/generate/async", request(post_processing=["CodeFormers"])
    )
    assert got == 400
    assert "S-Lab" in answer["errors"]["params.post_processing"]
    async with AsyncClient(live.url, key) as grid:
        too_big = ImageParams.model_construct(
            **{
                **ImageParams(prompt="x", width=1024, height=576).model_dump(),
                "post_processing": ["NMKD_Siax"],
            }
        )
        with pytest.raises(ApiError, match="4096x2304, over 2048"):
            await grid.submit_image(too_big)


async def test_a_spot_check_goes_to_a_referee_holding_the_post_processors(
    checked_network: LiveApp,
) -> None:
    live = checked_network
    requester, donor, operator = await register_accounts(live.url, "asker", "donor", "operator")
    await Horde(live.url, requester).ok(
        "POST", "/v2/generate/async", request(post_processing=["RealESRGAN_x2plus"]), 202
    )
    upscaling = CAPS.model_copy(update={"post_processors": ["RealESRGAN_x2plus"]})
    async with (
        FakeWorker(live.url, "newcomer", donor) as newcomer,
        FakeWorker(live.url, "referee", operator) as referee,
        AsyncClient(live.url, requester) as grid,
    ):
        job = await newcomer.link.pop(upscaling, wait=0)
        assert job is not None
        await newcomer.link.submit(job, job.params.seeds(), [png(1, 128, 128)])
        assert await referee.link.pop(CAPS, wait=0) is None
        check = await referee.link.pop(upscaling, wait=5)
        assert check is not None and check.params == job.params
        # the same picture, compared at the upscaled size
        await referee.link.submit(check, check.params.seeds(), [png(1, 128, 128, 9)])
        assert newcomer.link.worker_id is not None
        assert (await grid.worker(newcomer.link.worker_id)).checks_passed == 1


async def test_is_possible_once_an_online_worker_holds_the_post_processors(
    coordinator_config: CoordinatorConfig,
) -> None:
    config = dataclasses.replace(coordinator_config, network_view_seconds=0.0)
    runner, live = await start_app(config)
    try:
        requester, donor = await register_accounts(live.url, "asker", "donor")
        horde = Horde(live.url, requester)
        face_fixed = request(post_processing=["GFPGAN"])
        assert not await possible(horde, face_fixed)
        # (each pop notes the worker's offer before the job is queued, so it takes none)
        async with FakeWorker(live.url, "elsewhere", donor) as worker:
            # online with the model but without GFPGAN: still not possible
            assert await worker.link.pop(CAPS, wait=0) is None
            assert not await possible(horde, face_fixed)
            caps = CAPS.model_copy(update={"post_processors": ["GFPGAN"]})
            assert await worker.link.pop(caps, wait=0) is None
            assert await possible(horde, face_fixed)
            network = await horde.call("GET", "/v1/network")
            assert network[1]["post_processors"] == ["GFPGAN"]
    finally:
        await runner.cleanup()
