"""An engine that answers malformed messages (a hostile or broken model package) costs the
job one attempt and the engine one restart, never the worker: a real ImageWorker, a real
sandbox running tests.sandbox.engines:LyingImageEngine, a real coordinator on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.sdk import AsyncClient
from protocol.params import ImageParams
from sandbox import Sandbox, SandboxPolicy
from tests.conftest import LiveApp
from tests.fakes import FakeWorker
from worker.image.config import ImageWorkerConfig
from worker.image.worker import ImageWorker

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("lie", "field"), [("bad result", "seeds[0]"), ("bad progress", "step")])
async def test_a_malformed_answer_gives_the_job_back_and_restarts_the_engine(
    live: LiveApp, tmp_path: Path, lie: str, field: str
) -> None:
    params = ImageParams(prompt=lie, width=64, height=64, steps=2, seed=5)
    async with AsyncClient(live.url) as anon:
        created = await anon.submit_image(params)
    policy = SandboxPolicy(
        workdir_root=tmp_path,
        extra_env={"PYTHONPATH": str(REPO_ROOT)},
        start_timeout=60,
        job_timeout=60,
        packages=("sandbox", "protocol", "tests"),
    )
    config = ImageWorkerConfig(
        coordinator=live.url,
        model="unused",
        model_config=None,
        model_name="tiny",
        name="lied-to",
        identity_file=tmp_path / "id.key",
        # every progress message goes through the worker's callback
        progress_interval=0.0,
    )
    sandbox = await Sandbox.create("tests.sandbox.engines:LyingImageEngine", {}, policy)
    worker = FakeWorker(live.url, "lied-to")
    image_worker = ImageWorker(config, sandbox, worker.link)
    try:
        await worker.link.register()
        job = await worker.link.pop(image_worker.capabilities, wait=5)
        assert job is not None and job.id == created.id
        await image_worker.serve(job)  # returns: the worker carries on
        async with AsyncClient(live.url) as anon:
            status = await anon.job(created.id)
        assert status.state == "queued" and status.attempts == 1
        assert status.error is not None and "EngineMisbehaved: " in status.error
        assert f"{field}:" in status.error
        assert image_worker.jobs_done == 0
        # the engine that lied was replaced before the worker asked for more work
        assert sandbox.restarts == 1 and sandbox.pid is not None
    finally:
        await image_worker.aclose()
        await worker.link.aclose()
