"""AI Horde's `is_possible` (issue 21): a request that no online worker could serve (its
model, size, steps, source processing, or signed results) is queued all the same, with
`is_possible: false` in check/status and AI Horde's `NoAvailableWorker` warning when it is
made, v1's warning, each saying why; true once a worker that fits polls. Through HTTP,
with our workers and an AI Horde worker of different offers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.economy import suspicion
from protocol.params import ImageParams
from tests.conftest import LiveApp, start_app
from tests.coordinator.http.test_horde import CHECK, Horde, request, shaped, webp
from tests.fakes import CAPS, FakeWorker, register_accounts

IMG2IMG = {"source_image": webp((200, 30, 30)), "source_processing": "img2img"}
INPAINTING = {
    "source_image": webp((200, 30, 30)),
    "source_mask": webp((255, 255, 255)),
    "source_processing": "inpainting",
}


@pytest.fixture
async def live(tmp_path: Path, database_url: str) -> AsyncIterator[LiveApp]:
    # the workers' offers are read afresh for every answer (no shared view to wait out)
    config = CoordinatorConfig(
        data_dir=tmp_path / "data", database_url=database_url, port=0, network_view_seconds=0.0
    )
    runner, app = await start_app(config)
    try:
        yield app
    finally:
        await runner.cleanup()


async def possible(horde: Horde, body: dict[str, Any]) -> bool:
    """Queue `body`, read is_possible from its check and status, then cancel it (so that
    no worker of the test pops it)."""
    created = await horde.ok("POST", "/v2/generate/async", body, 202)
    job = created["id"]
    check = shaped(await horde.ok("GET", f"/v2/generate/check/{job}"), CHECK)
    status = await horde.ok("GET", f"/v2/generate/status/{job}")
    await horde.ok("DELETE", f"/v2/generate/status/{job}")
    assert check["waiting"] >= 1 and status["is_possible"] is check["is_possible"]
    warned = [w["code"] for w in created["warnings"]] == ["NoAvailableWorker"]
    assert warned is not check["is_possible"], created
    return bool(check["is_possible"])


async def test_is_possible_follows_the_online_workers_offers(live: LiveApp) -> None:
    requester, donor = await register_accounts(live.url, "asker", "donor")
    horde = Horde(live.url, requester)
    plain = request()
    assert not await possible(horde, plain)  # nobody online

    async with FakeWorker(live.url, "ours", donor) as ours:
        # ours: model tiny, 512x512 pixels, 50 steps, no source images
        assert await ours.link.pop(CAPS, wait=0) is None
        assert await possible(horde, plain)
        assert await possible(horde, {**plain, "trusted_workers": True})
        assert not await possible(horde, {**plain, "models": ["another"]})
        assert not await possible(horde, request(width=768, height=768))
        assert not await possible(horde, request(steps=60))
        assert not await possible(horde, {**plain, **IMG2IMG})
        assert not await possible(horde, {**plain, **INPAINTING})

        # an AI Horde worker: 1024x1024 pixels, img2img (its default) but no painting
        bridge = Horde(live.url, donor)
        popped = await bridge.ok(
            "POST",
            "/v2/generate/pop",
            {"name": "bridge", "models": ["tiny"], "max_pixels": 1024 * 1024},
        )
        assert popped["id"] is None
        assert await possible(horde, {**plain, **IMG2IMG})
        assert await possible(horde, request(width=768, height=768))
        assert not await possible(horde, {**plain, **INPAINTING})
        # ... but it does not sign its results, and takes one image per job
        assert not await possible(
            horde, {**request(width=768, height=768), "trusted_workers": True}
        )
        assert not await possible(horde, request(width=768, height=768, n=2))

        # ours again, now taking inpainting too
        assert await ours.link.pop(CAPS.model_copy(update={"inpainting": True}), wait=0) is None
        assert await possible(horde, {**plain, **INPAINTING})

        # the network view says what each image worker takes (the web page offers uploads)
        network = await horde.ok("GET", "/v1/network")
        takes = {w["name"]: (w["img2img"], w["inpainting"]) for w in network["workers"]}
        assert takes == {"ours": (False, True), "bridge": (True, False)}, takes
        # ... and which ControlNet types (the page offers only what some worker serves)
        control = {"controlnets": ["canny", "depth"], "control_annotators": ["canny"]}
        assert await ours.link.pop(CAPS.model_copy(update=control), wait=0) is None
        network = await horde.ok("GET", "/v1/network")
        mine = next(w for w in network["workers"] if w["name"] == "ours")
        assert (mine["controlnets"], mine["control_annotators"]) == (["canny", "depth"], ["canny"])


async def test_a_paused_worker_makes_nothing_possible(live: LiveApp) -> None:
    requester, donor = await register_accounts(live.url, "asker", "donor")
    horde = Horde(live.url, requester)
    async with FakeWorker(live.url, "ours", donor) as ours:
        assert await ours.link.pop(CAPS, wait=0) is None
        assert await possible(horde, request())
        worker = await live.store.workers.worker_by_token(ours.link.token or "")
        assert worker is not None
        async with live.store.db.begin() as conn:
            await suspicion.pause(conn, worker.id, "a test pauses it")
        assert not await possible(horde, request())


async def _warned(horde: Horde, body: dict[str, Any]) -> str:
    created = await horde.ok("POST", "/v2/generate/async", body, 202)
    await horde.ok("DELETE", f"/v2/generate/status/{created['id']}")
    (warning,) = created["warnings"]
    assert warning["code"] == "NoAvailableWorker"
    return str(warning["message"])


async def test_the_warnings_say_why_on_both_doors(live: LiveApp) -> None:
    requester, donor = await register_accounts(live.url, "asker", "donor")
    horde = Horde(live.url, requester)
    assert "no image worker is online" in await _warned(horde, request())
    async with FakeWorker(live.url, "ours", donor) as ours:
        assert await ours.link.pop(CAPS, wait=0) is None
        assert "offers the model 'another'" in await _warned(
            horde, {**request(), "models": ["another"]}
        )
        assert "no online worker with that model takes img2img jobs" in await _warned(
            horde, {**request(), **IMG2IMG}
        )
        assert "makes 768x768 images" in await _warned(horde, request(width=768, height=768))
        # v1: a warning with the reason; none when a worker could
        async with AsyncClient(live.url, requester) as client:
            params = ImageParams(prompt="x", width=64, height=64, steps=60, model="tiny")
            created = await client.submit_image(params)
            assert created.warnings == [
                "no online worker that takes them runs 60 steps; the job waits until one can"
            ]
            fine = await client.submit_image(params.model_copy(update={"steps": 4}))
            assert fine.warnings == []
