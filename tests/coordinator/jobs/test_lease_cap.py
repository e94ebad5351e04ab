"""The lease cap counts every phase of an image job (issue 21): its sampling steps and,
for each image, its VAE passes (the result's decode; a source image's encode; the masked
image's for inpainting), each `lease_vae_steps` steps at the slowest acceptable pace. An
honest slow worker that reports through a long decode is not cut off at the steps' time;
one that reports forever still loses the job at the cap. Real HTTP, on a MockClock."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.params import ImageParams, SourceProcessing
from tests.adversarial.test_leases import REAP_INTERVAL, STEP, Held, keep_reporting, reaped
from tests.clock import MockClock
from tests.conftest import LiveApp, start_app
from tests.fakes import CAPS, FakeWorker, job_pngs, register_accounts

BASE = 11.0  # lease_base_seconds (no cap below is a multiple of STEP)
TTL_FACTOR = 2.0
VAE_STEPS = 20.0
SIDE = 64  # one 64x64 step per second: the caps below are in steps
PAINTER = CAPS.model_copy(update={"img2img": True, "inpainting": True})


@pytest.fixture
async def live(tmp_path: Path, database_url: str, clock: MockClock) -> AsyncIterator[LiveApp]:
    config = CoordinatorConfig(
        data_dir=tmp_path / "data",
        database_url=database_url,
        port=0,
        lease_base_seconds=BASE,
        lease_ttl_factor=TTL_FACTOR,
        lease_pixel_steps_per_second=SIDE * SIDE,
        lease_vae_steps=VAE_STEPS,
        reap_interval=REAP_INTERVAL,
    )
    runner, app = await start_app(config, clock)
    try:
        yield app
    finally:
        await runner.cleanup()


def _png(mode: str, colour: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (SIDE, SIDE), colour).save(out, format="PNG")
    return out.getvalue()


# (source processing, source image, mask) -> the VAE passes counted per image
CASES: dict[SourceProcessing, tuple[bytes | None, bytes | None, int]] = {
    "txt2img": (None, None, 1),
    "img2img": (_png("RGB", (9, 9, 9)), None, 2),
    "inpainting": (_png("RGB", (9, 9, 9)), _png("L", (255,)), 3),
}


@pytest.mark.parametrize("processing", list(CASES))
async def test_reports_keep_the_job_through_every_phase_and_no_longer(
    live: LiveApp, clock: MockClock, processing: SourceProcessing
) -> None:
    source, mask, passes = CASES[processing]
    steps, n = 10, 2
    (key,) = await register_accounts(live.url, "asker")
    params = ImageParams(
        prompt="x", width=SIDE, height=SIDE, steps=steps, n=n, seed=1, source_processing=processing
    )
    async with (
        AsyncClient(live.url, key) as requester,
        FakeWorker(live.url, "slow") as worker,
    ):
        job_id = (await requester.submit_image(params, source_image=source, source_mask=mask)).id
        job = await worker.link.pop(PAINTER, wait=0)
        assert job is not None and job.id == job_id
        # the steps alone would allow TTL_FACTOR * (BASE + n * steps) seconds
        cap = TTL_FACTOR * (BASE + n * (steps + passes * VAE_STEPS))
        assert cap > TTL_FACTOR * (BASE + n * steps) + 2 * STEP

        held = await keep_reporting(clock, lambda: worker.link.progress(job.id, 0, 1, steps), cap)

        assert cap < held <= cap + STEP, Held(held, cap)
        status = await reaped(clock, lambda: requester.job(job_id))
        assert status.state == "queued" and status.error is not None
        assert f"time limit of {cap:.0f} s" in status.error


async def test_a_slow_honest_worker_finishes_an_img2img_job_past_the_steps_time(
    live: LiveApp, clock: MockClock
) -> None:
    source, _, passes = CASES["img2img"]
    (key,) = await register_accounts(live.url, "asker")
    params = ImageParams(
        prompt="x", width=SIDE, height=SIDE, steps=10, seed=1, source_processing="img2img"
    )
    async with AsyncClient(live.url, key) as requester, FakeWorker(live.url, "slow") as worker:
        job_id = (await requester.submit_image(params, source_image=source)).id
        job = await worker.link.pop(PAINTER, wait=0)
        assert job is not None
        popped_at = job.lease_deadline - job.lease_seconds
        # its encode and decode take 2 x 20 steps' time: well past what the steps allow
        for _ in range(int(TTL_FACTOR * (BASE + 10 + passes * VAE_STEPS) / STEP) - 1):
            await worker.link.progress(job.id, 0, 10, 10)
            clock.advance(STEP)
        assert clock() - popped_at > TTL_FACTOR * (BASE + 10) + STEP
        await worker.link.submit(job, params.seeds(), job_pngs(job))
        assert (await requester.job(job_id)).state == "done"
