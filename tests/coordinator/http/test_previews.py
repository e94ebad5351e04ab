"""Live previews through a real coordinator on 127.0.0.1 (README: Live previews): only a
stream that asks (`?previews=true`) gets `preview` events, the worker is told to send them
only while one watches, a bad preview is refused naming the field, and nothing is kept
once the stream closes. The CLI's `--preview FILE` runs as a real process."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.http.state import PREVIEWS
from protocol.messages import JobStatus, LeasedJob
from protocol.params import ImageParams
from protocol.preview import JobPreview
from tests.conftest import LiveApp, start_app
from tests.fakes import CAPS, FakeWorker, job_pngs
from tests.preview_streams import Collected
from worker.errors import CoordinatorRejected

PARAMS = ImageParams(prompt="a lighthouse", width=64, height=64, steps=20, seed=7)


@pytest.fixture
async def live(sqlite_only_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    """Previews never touch the database: SQLite alone."""
    runner, app = await start_app(sqlite_only_config)
    try:
        yield app
    finally:
        await runner.cleanup()


def _picture(size: tuple[int, int] = (8, 8), kind: str = "JPEG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 30)).save(buffer, format=kind)
    return base64.b64encode(buffer.getvalue()).decode()


async def _until_wanted(worker: FakeWorker, job: LeasedJob) -> None:
    """Report progress until the coordinator says a stream with previews watches."""
    async with asyncio.timeout(10):
        while True:
            if (await worker.link.progress(job.id, 0, 2, PARAMS.steps)).previews:
                return
            await asyncio.sleep(0.02)


async def test_only_a_stream_that_asked_gets_previews_before_the_result(live: LiveApp) -> None:
    async with AsyncClient(live.url) as requester, FakeWorker(live.url) as worker:
        created = await requester.submit_image(PARAMS)
        job = await worker.link.pop(CAPS, wait=5)
        assert job is not None and job.id == created.id
        # nobody watches with previews: the worker is told so, and a preview is not kept
        unwanted = await worker.link.progress(job.id, 0, 1, PARAMS.steps, _picture())
        assert not unwanted.previews and live.app[PREVIEWS].held == 0
        watched, plain = Collected(), Collected()
        async with asyncio.timeout(10), asyncio.TaskGroup() as streams:
            streams.create_task(watched.read(requester.image_events(job.id, previews=True)))
            streams.create_task(plain.read(requester.image_events(job.id)))
            await _until_wanted(worker, job)
            await plain.opened.wait()
            await worker.link.progress(job.id, 0, 5, PARAMS.steps, _picture())
            await watched.previewed.wait()
            await worker.link.submit(job, PARAMS.seeds(), job_pngs(job))
    seen, unseen = watched.items, plain.items
    previews = [item for item in seen if isinstance(item, JobPreview)]
    assert [(p.image, p.step, p.steps, p.content_type) for p in previews] == [
        (0, 5, 20, "image/jpeg")
    ]
    with Image.open(io.BytesIO(base64.b64decode(previews[0].data))) as image:
        assert image.size == (8, 8)
    # the preview came before the result, and the result is the last event
    statuses = [item for item in seen if isinstance(item, JobStatus)]
    assert statuses[-1].state == "done" and seen[-1] is statuses[-1]
    assert seen.index(previews[0]) < len(seen) - 1
    # the stream that did not ask saw the same job without any preview
    plain_statuses = [item for item in unseen if isinstance(item, JobStatus)]
    assert plain_statuses and plain_statuses == unseen
    assert plain_statuses[-1].state == "done"
    # nothing held after the streams closed; the result is the worker's PNG, not a preview
    assert live.app[PREVIEWS].held == 0 and not live.app[PREVIEWS].wanted(job.id)
    assert statuses[-1].images and statuses[-1].images[0].seed == PARAMS.seed


BAD_PREVIEWS = [
    (base64.b64encode(b"GIF89a" + bytes(64)).decode(), "JPEG, PNG or WebP"),
    ("not base64!", "base64"),
    (_picture((512, 64), "PNG"), "512x64 pixels"),
    (base64.b64encode(b"\xff\xd8\xff" + bytes(32)).decode(), "cannot be read"),
    ("A" * 50_000, "at most"),
]


async def test_a_bad_preview_is_refused_naming_the_field(live: LiveApp) -> None:
    async with AsyncClient(live.url) as requester, FakeWorker(live.url) as worker:
        await requester.submit_image(PARAMS)
        job = await worker.link.pop(CAPS, wait=5)
        assert job is not None
        for preview, message in BAD_PREVIEWS:
            with pytest.raises(CoordinatorRejected) as refused:
                await worker.link.progress(job.id, 0, 3, PARAMS.steps, preview)
            assert refused.value.status == 400
            assert "preview" in str(refused.value) and message in str(refused.value), message
        status = await requester.job(job.id)
        assert status.step == 0  # nothing of the reports was recorded


@pytest.mark.slow
async def test_cli_preview_file_holds_the_latest_preview(live: LiveApp, tmp_path: Path) -> None:
    target = tmp_path / "previews" / "latest.png"
    env = {**os.environ, "IDLEGRID_CREDENTIALS": str(tmp_path / "credentials.json")}
    command = [sys.executable, "-m", "client.cli", "generate", PARAMS.prompt, "--size", "64x64"]
    command += ["--steps", "20", "--seed", "7", "-o", str(tmp_path / "out")]
    command += ["--preview", str(target), "--json", "--coordinator", live.url]
    cli = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        async with FakeWorker(live.url) as worker:
            job = await worker.link.pop(CAPS, wait=30)
            assert job is not None
            await _until_wanted(worker, job)
            await worker.link.progress(job.id, 0, 5, PARAMS.steps, _picture((8, 8)))
            async with asyncio.timeout(30):
                while True:
                    if target.exists():
                        break
                    await asyncio.sleep(0.05)
            await worker.link.submit(job, PARAMS.seeds(), job_pngs(job))
        async with asyncio.timeout(60):
            out, err = await cli.communicate()
    finally:
        if cli.returncode is None:
            cli.kill()
            await cli.wait()
    assert cli.returncode == 0, err.decode()
    # written as FILE's suffix says (the worker sent a JPEG), complete, nothing left beside it
    with Image.open(target) as image:
        assert image.format == "PNG" and image.size == (8, 8)
        red, _, _ = image.convert("RGB").getpixel((4, 4))  # type: ignore[misc]
        assert red > 150
    assert [p.name for p in target.parent.iterdir()] == ["latest.png"]
    assert b"paths" in out
