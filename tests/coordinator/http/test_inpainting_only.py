"""Inpainting-only workers (issue 21): a worker whose checkpoint is an inpainting one
(9-channel UNet) pops with `txt2img` and `img2img` off, and gets inpainting and
outpainting jobs but no plain text-to-image or img2img job, which it would render
differently; an AI Horde worker offering only inpainting models likewise, as AI Horde does.
Over HTTP, with jobs of every kind queued ahead."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

from tests.conftest import LiveApp
from tests.coordinator.http.test_horde import Horde, request
from tests.coordinator.http.test_is_possible import IMG2IMG, INPAINTING
from tests.fakes import CAPS, FakeWorker, register_accounts

PAINTER = CAPS.model_copy(update={"txt2img": False, "img2img": False, "inpainting": True})


def _transparent_corner() -> str:
    image = Image.new("RGBA", (64, 64), (10, 20, 30, 255))
    image.paste((0, 0, 0, 0), (0, 0, 16, 16))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


async def _queue(horde: Horde, body: dict[str, Any], possible: bool) -> str:
    created = await horde.ok("POST", "/v2/generate/async", body, 202)
    assert (created["warnings"] == []) is possible, created
    return str(created["id"])


async def test_an_inpainting_checkpoint_gets_only_inpainting_jobs(live: LiveApp) -> None:
    requester, donor = await register_accounts(live.url, "asker", "donor")
    horde = Horde(live.url, requester)
    async with (
        FakeWorker(live.url, "painter", donor) as painter,
        FakeWorker(live.url, "plain", donor) as plain_worker,
    ):
        assert await painter.link.pop(PAINTER, wait=0) is None
        # only the painter online: nobody could make the plain and img2img jobs
        plain = await _queue(horde, request(), possible=False)
        img2img = await _queue(horde, {**request(), **IMG2IMG}, possible=False)
        inpainting = await _queue(horde, {**request(), **INPAINTING}, possible=True)
        outpainting = await _queue(
            horde,
            {
                **request(),
                "source_image": _transparent_corner(),
                "source_processing": "outpainting",
            },
            possible=True,
        )
        # the older jobs wait for a worker that renders them as asked
        popped = [await painter.link.pop(PAINTER, wait=0) for _ in range(3)]
        assert [job.id if job else None for job in popped] == [inpainting, outpainting, None]
        everything = CAPS.model_copy(update={"img2img": True, "inpainting": True})
        first = await plain_worker.link.pop(everything, wait=0)
        second = await plain_worker.link.pop(everything, wait=0)
        assert (first and first.id, second and second.id) == (plain, img2img)


async def test_an_ai_horde_worker_with_only_inpainting_models(live: LiveApp) -> None:
    requester, donor = await register_accounts(live.url, "asker", "donor")
    horde = Horde(live.url, requester)
    bridge = Horde(live.url, donor)
    pop = {"name": "bridge", "models": ["stable_diffusion_inpainting"], "allow_painting": True}
    assert (await bridge.ok("POST", "/v2/generate/pop", pop))["id"] is None
    await _queue(horde, {**request(), "models": []}, possible=False)
    inpainting = await _queue(horde, {**request(), **INPAINTING, "models": []}, possible=True)
    popped = await bridge.ok("POST", "/v2/generate/pop", pop)
    assert popped["id"] == inpainting and popped["model"] == "stable_diffusion_inpainting"
    assert (await bridge.ok("POST", "/v2/generate/pop", pop))["id"] is None
    # a worker with both kinds runs an inpainting job on its inpainting model, a plain one
    # on the other
    both = {**pop, "name": "both", "models": ["stable_diffusion_inpainting", "tiny"]}
    inpainting = await _queue(horde, {**request(), **INPAINTING, "models": []}, possible=True)
    popped = await bridge.ok("POST", "/v2/generate/pop", both)
    assert popped["id"] is not None and popped["model"] == "tiny"  # the older, plain job
    popped = await bridge.ok("POST", "/v2/generate/pop", both)
    assert popped["id"] == inpainting and popped["model"] == "stable_diffusion_inpainting"
