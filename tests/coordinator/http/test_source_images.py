"""Source images and masks through the doors (issue 21): AI Horde v2 `source_image` /
`source_mask` and the same fields on v1, as base64; checked before anything is charged,
stored content-addressed, their digests in the job's parameters."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zlib

import aiohttp
import numpy as np
import pytest
from PIL import Image

from client.api import worker_routes
from coordinator.http.bodies import body_limit
from coordinator.http.state import FILES
from tests.conftest import LiveApp
from tests.coordinator.http.test_horde import Horde, request, webp
from tests.fakes import CAPS, FakeWorker, png, register_accounts
from worker.errors import CoordinatorRejected, LeaseLost


def encoded(image: Image.Image, kind: str = "PNG") -> str:
    out = io.BytesIO()
    image.save(out, format=kind)
    return base64.b64encode(out.getvalue()).decode()


def digest(text: str) -> str:
    return hashlib.sha256(base64.b64decode(text)).hexdigest()


def png_bomb(side: int) -> str:
    """A valid-looking PNG header declaring side x side pixels, with a little zero data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    data = zlib.compress(b"\0" * (1 << 20), 9)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


async def _kudos(horde: Horde) -> float:
    return float((await horde.ok("GET", "/v2/find_user"))["kudos"])


async def _v1(url: str, key: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/api/v1/jobs/image", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as resp,
    ):
        answer: dict[str, object] = await resp.json()
        return resp.status, answer


async def test_a_v2_img2img_request_is_stored_with_its_digest(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "painter")
    horde = Horde(live.url, key)
    source = webp((200, 30, 30), (96, 80))
    body = {**request(denoising_strength=0.5), "source_image": source}
    created = await horde.ok("POST", "/v2/generate/async", body, 202)
    job = await live.store.image_jobs.get(created["id"])
    assert job is not None
    assert job.params.source_processing == "img2img"
    assert job.params.denoising_strength == 0.5
    assert job.params.source_image == digest(source)
    assert job.params.source_mask is None
    assert await live.app[FILES].exists(digest(source))


async def test_a_v2_inpainting_request_stores_the_mask(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "masker")
    source, mask = encoded(Image.new("RGB", (64, 64), (9, 9, 9))), webp((255, 255, 255))
    body = {
        **request(),
        "source_image": source,
        "source_mask": mask,
        "source_processing": "inpainting",
    }
    created = await Horde(live.url, key).ok("POST", "/v2/generate/async", body, 202)
    job = await live.store.image_jobs.get(created["id"])
    assert job is not None
    assert (job.params.source_image, job.params.source_mask) == (digest(source), digest(mask))
    assert await live.app[FILES].exists(digest(mask))


async def test_v1_takes_the_same_fields(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "oneer")
    source = encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    body = {
        "prompt": "a cube",
        "width": 64,
        "height": 64,
        "steps": 4,
        "source_processing": "img2img",
        "denoising_strength": 0.6,
        "source_image": source,
    }
    status, answer = await _v1(live.url, key, body)
    assert status == 202, answer
    job = await live.store.image_jobs.get(str(answer["id"]))
    assert job is not None and job.params.source_image == digest(source)
    assert await live.app[FILES].exists(digest(source))


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"source_image": "not base64!"}, "source_image"),
        ({"source_image": base64.b64encode(b"plain text").decode()}, "source_image"),
        ({"source_image": png_bomb(60000)}, "source_image"),
        (
            {
                "source_image": webp((1, 1, 1)),
                "source_mask": webp((255, 255, 255), (32, 32)),
                "source_processing": "inpainting",
            },
            "source_mask",
        ),
        (
            {"source_image": webp((1, 1, 1)), "source_processing": "inpainting"},
            "source_mask",
        ),
        (
            {"source_image": webp((1, 1, 1)), "source_mask": webp((255, 255, 255))},
            "source_mask",  # img2img takes no mask
        ),
        ({"source_mask": webp((255, 255, 255))}, "source_mask"),  # a mask without a source
        ({"source_image": webp((1, 1, 1)), "source_processing": "txt2img"}, "source_image"),
    ],
)
async def test_a_bad_source_is_named_and_costs_nothing(
    live: LiveApp, extra: dict[str, object], named: str
) -> None:
    (key,) = await register_accounts(live.url, "careless")
    horde = Horde(live.url, key)
    before = await _kudos(horde)
    got, answer = await horde.call("POST", "/v2/generate/async", {**request(), **extra})
    assert got == 400, answer
    assert named in answer["errors"], answer
    assert await _kudos(horde) == before
    # the same on v1
    body = {"prompt": "a cube", "width": 64, "height": 64, "steps": 4, **extra}
    if "source_image" in extra:  # (v1's default is txt2img)
        body.setdefault("source_processing", "img2img")
    status, v1 = await _v1(live.url, key, body)
    assert status == 400, v1
    assert named in str(v1), v1
    assert await _kudos(horde) == before


async def test_the_worker_holding_the_job_downloads_its_sources(live: LiveApp) -> None:
    requester, donor, other = await register_accounts(live.url, "asker", "donor", "other")
    source, mask = encoded(Image.new("RGBA", (64, 64), (5, 6, 7, 255))), webp((255, 0, 0))
    body = {
        **request(),
        "source_image": source,
        "source_mask": mask,
        "source_processing": "inpainting",
    }
    await Horde(live.url, requester).ok("POST", "/v2/generate/async", body, 202)
    async with (
        FakeWorker(live.url, "holder", donor) as holder,
        FakeWorker(live.url, "bystander", other) as bystander,
    ):
        # a worker that does not say it can is not given the job
        assert await holder.link.pop(CAPS, wait=0) is None
        img2img_only = CAPS.model_copy(update={"img2img": True})
        assert await holder.link.pop(img2img_only, wait=0) is None
        painter = CAPS.model_copy(update={"img2img": True, "inpainting": True})
        job = await holder.link.pop(painter, wait=0)
        assert job is not None
        assert await holder.link.sources(job) == [base64.b64decode(source), base64.b64decode(mask)]
        # the digests are in the signed params
        assert (job.params.source_image, job.params.source_mask) == (digest(source), digest(mask))
        # only the lessee, only the job's own digests
        with pytest.raises(LeaseLost):
            await bystander.link.sources(job)

        with pytest.raises(CoordinatorRejected) as refused:
            await holder.link.send(worker_routes.source(job.id, "0" * 64))
        assert refused.value.status == 404


async def test_an_img2img_job_waits_for_a_worker_that_takes_source_images(live: LiveApp) -> None:
    requester, donor = await register_accounts(live.url, "asker", "donor")
    horde = Horde(live.url, requester)
    await horde.ok(
        "POST", "/v2/generate/async", {**request(), "source_image": webp((1, 2, 3))}, 202
    )
    async with FakeWorker(live.url, "plain", donor) as worker:
        assert await worker.link.pop(CAPS, wait=0) is None
        # an AI Horde worker that turns img2img off is not given it either
        bridge = Horde(live.url, donor)
        pop = {"name": "bridge", "models": ["tiny"], "allow_img2img": False}
        assert (await bridge.ok("POST", "/v2/generate/pop", pop))["id"] is None
        # AI Horde's default takes it, with the source image inline
        popped = await bridge.ok("POST", "/v2/generate/pop", {**pop, "allow_img2img": True})
        assert popped["id"] is not None
        assert popped["source_processing"] == "img2img"
        assert popped["source_image"] == webp((1, 2, 3)) and popped["source_mask"] is None
        assert popped["payload"]["denoising_strength"] == 0.75


def test_the_request_routes_take_a_2048_rgba_png_source_and_mask() -> None:
    # an uncompressed 2048x2048 RGBA PNG (the largest a PNG of that size needs), twice,
    # as base64, besides the rest of the request
    raw = 2048 * (1 + 2048 * 4)
    for path in ("/api/v1/jobs/image", "/api/v2/generate/async"):
        assert body_limit("POST", path) > 2 * ((raw + raw // 100) * 4 // 3) + 64 * 1024


async def test_a_512_noise_source_is_taken_whole(live: LiveApp) -> None:
    """A source that does not compress at all (the body AI Horde's clients send for a
    photo is smaller): accepted, stored byte for byte."""
    (key,) = await register_accounts(live.url, "photographer")
    noise = np.random.default_rng(7).integers(0, 256, (512, 512, 4), dtype=np.uint8)
    source = encoded(Image.fromarray(noise, "RGBA"))
    body = json.dumps({**request(), "source_image": source}).encode()
    assert len(body) > 1024 * 1024
    headers = {"apikey": key, "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{live.url}/api/v2/generate/async", data=io.BytesIO(body), headers=headers
        ) as resp,
    ):
        assert resp.status == 202, await resp.text()
        created = await resp.json()
    job = await live.store.image_jobs.get(created["id"])
    assert job is not None and job.params.source_image == digest(source)
    async with live.app[FILES].local_copy(digest(source)) as path:
        assert path.read_bytes() == base64.b64decode(source)


async def test_a_spot_check_reruns_with_the_same_source(checked_network: LiveApp) -> None:
    live = checked_network
    requester, donor, operator = await register_accounts(live.url, "asker", "donor", "operator")
    source = webp((40, 50, 60))
    painter = CAPS.model_copy(update={"img2img": True})
    await Horde(live.url, requester).ok(
        "POST", "/v2/generate/async", {**request(), "source_image": source}, 202
    )
    async with (
        FakeWorker(live.url, "newcomer", donor) as newcomer,
        FakeWorker(live.url, "referee", operator) as referee,
    ):
        job = await newcomer.link.pop(painter, wait=0)
        assert job is not None
        await newcomer.link.submit(job, job.params.seeds(), [png(1)])
        # the check goes only to a verifier that takes source images
        assert await referee.link.pop(CAPS, wait=0) is None
        check = await referee.link.pop(painter, wait=5)
        assert check is not None and check.id != job.id
        assert check.params == job.params and check.params_hash == job.params_hash
        assert await referee.link.sources(check) == [base64.b64decode(source)]
