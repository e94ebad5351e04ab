"""`idlegrid generate --nsfw`: a model the image model reference marks nsfw is served only
to a request that says it is NSFW, from the command line as from the SDK and AI Horde."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

from client.api.worker_routes import Capabilities
from coordinator.config import CoordinatorConfig
from tests.client.test_cli import _cli
from tests.conftest import start_app
from tests.coordinator.http.test_image_models import CAPS, NAUGHTY, SD_SHA
from tests.fakes import FakeWorker, job_pngs, register_accounts


async def test_generate_asks_for_an_nsfw_model_with_nsfw(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    config = CoordinatorConfig(data_dir=tmp_path / "data", database_url=url, port=0)
    runner, live = await start_app(dataclasses.replace(config, image_models=(NAUGHTY,)))
    try:
        (asker,) = await register_accounts(live.url, "asker")
        args = ("generate", "a cube", "--model", "Naughty", "--size", "64x64", "--steps", "4")
        refused = await _cli(live.url, asker, *args, "-o", str(tmp_path), "--json")
        assert refused.returncode != 0
        assert "nsfw" in refused.stderr and "Naughty" in refused.stderr, refused.stderr
        async with FakeWorker(live.url) as worker:
            caps = Capabilities(models=["Naughty"], checkpoint_sha256=SD_SHA, **CAPS)

            async def serve() -> None:
                job = await worker.link.pop(caps, wait=30)
                assert job is not None and job.params.model == "Naughty"
                await worker.link.submit(job, job.params.seeds(), job_pngs(job))

            serving = asyncio.create_task(serve())
            done = await _cli(live.url, asker, *args, "--nsfw", "-o", str(tmp_path), "--json")
            await serving
        assert done.returncode == 0, done.stderr
        (path,) = json.loads(done.stdout)["paths"]
        assert Path(path).name.endswith("-0.png") and Path(path).parent == tmp_path
    finally:
        await runner.cleanup()
