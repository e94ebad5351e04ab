"""Long phases keep their lease (issue 21): while the engine works without reporting a
sampling step (a source image's encode, the VAE decode), the worker reports again, so a
job longer than its lease is still done and paid. A real coordinator on 127.0.0.1 with a
1 s lease, a real ImageWorker and sandbox; the engine is a fake that stays silent."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.engine import ImageProgress, ImageResult
from protocol.params import ImageParams
from sandbox import Sandbox, SandboxPolicy
from sandbox.calls import Emit
from tests.conftest import LiveApp, start_app
from tests.fakes import FakeImageEngine, FakeWorker
from worker.image.config import ImageWorkerConfig
from worker.image.worker import ImageWorker

REPO_ROOT = Path(__file__).resolve().parents[3]
LEASE = 1.0
SILENT_SECONDS = 3.5


class SilentEngine(FakeImageEngine):
    """A fake engine that works `options["seconds"]` without emitting any progress."""

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self.seconds = float(options["seconds"])

    def image(
        self, params: ImageParams, emit: Emit[ImageProgress]
    ) -> tuple[ImageResult, list[bytes]]:
        time.sleep(self.seconds)
        return super().image(params, emit)


@pytest.fixture
async def short_leases(tmp_path: Path) -> AsyncIterator[LiveApp]:
    config = CoordinatorConfig(
        data_dir=tmp_path / "data",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'store.db'}",
        port=0,
        lease_timeout=LEASE,
        reap_interval=0.2,
    )
    runner, app = await start_app(config)
    try:
        yield app
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("heartbeat", [True, False])
async def test_a_silent_engine_keeps_the_lease_through_the_heartbeat(
    short_leases: LiveApp, tmp_path: Path, heartbeat: bool
) -> None:
    params = ImageParams(prompt="a long decode", width=64, height=64, steps=2, seed=5)
    async with AsyncClient(short_leases.url) as anon:
        created = await anon.submit_image(params)
    policy = SandboxPolicy(
        workdir_root=tmp_path,
        extra_env={"PYTHONPATH": str(REPO_ROOT)},
        start_timeout=60,
        job_timeout=60,
        packages=("sandbox", "protocol", "tests", "client", "coordinator", "worker"),
    )
    config = ImageWorkerConfig(
        coordinator=short_leases.url,
        model="unused",
        model_config=None,
        model_name="tiny",
        name="silent",
        identity_file=tmp_path / "id.key",
        # None: a third of the lease; without the heartbeat, never within the job
        heartbeat_interval=None if heartbeat else 60.0,
    )
    sandbox = await Sandbox.create(f"{__name__}:SilentEngine", {"seconds": SILENT_SECONDS}, policy)
    worker = FakeWorker(short_leases.url, "silent")
    image_worker = ImageWorker(config, sandbox, worker.link)
    try:
        await worker.link.register()
        job = await worker.link.pop(image_worker.capabilities, wait=5)
        assert job is not None and job.id == created.id
        assert job.lease_seconds == LEASE
        assert image_worker.heartbeat_interval(job) == (LEASE / 3 if heartbeat else 60.0)
        started = time.monotonic()
        await image_worker.serve(job)
        assert time.monotonic() - started >= SILENT_SECONDS
        async with AsyncClient(short_leases.url) as anon:
            status = await anon.job(created.id)
        if heartbeat:
            assert status.state == "done", status
            assert image_worker.jobs_done == 1
        else:
            # the lease ran out mid-job: taken back, the late result refused
            assert image_worker.jobs_done == 0
            assert status.state != "done"
    finally:
        await image_worker.aclose()
        await worker.link.aclose()
