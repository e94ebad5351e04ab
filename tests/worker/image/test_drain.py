"""Stopping an image worker with real signals: the first SIGTERM or Ctrl-C finishes the job
in hand (done and paid) and pops no more; a second one gives the job back at once.

The worker is a real subprocess (real ImageWorker, real sandbox, `run_until_signalled`
as `idlegrid worker image` runs it) whose engine is a fake that takes a set time, so the
signal reliably lands mid-job. The coordinator is a real one on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.engine import ImageProgress, ImageResult
from protocol.messages import JobStatus
from protocol.params import ImageParams
from sandbox.calls import Emit
from tests.conftest import LiveApp, start_app
from tests.fakes import FakeImageEngine, register_accounts
from worker.common.service import Drain

REPO_ROOT = Path(__file__).resolve().parents[3]
SMALL: dict[str, Any] = {"prompt": "a slow fake", "width": 64, "height": 64, "steps": 10, "seed": 3}


class SlowEngine(FakeImageEngine):
    """A fake engine whose every job takes `options["seconds"]`, reporting progress."""

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self.seconds = float(options["seconds"])

    def image(
        self, params: ImageParams, emit: Emit[ImageProgress]
    ) -> tuple[ImageResult, list[bytes]]:
        for step in range(1, params.steps + 1):
            time.sleep(self.seconds / params.steps)
            emit(ImageProgress(image=0, step=step, steps=params.steps, n=params.n))
        return super().image(params, emit)


async def _worker_main(url: str, api_key: str, tmp: str, seconds: float) -> int:
    """The worker subprocess: what worker.image.main._serve does, with the slow engine."""
    from protocol.signing import Identity
    from sandbox import Sandbox, SandboxPolicy
    from worker.common.controls_cli import status_outputs
    from worker.common.link import CoordinatorLink
    from worker.common.service import run_until_signalled
    from worker.image.config import ImageWorkerConfig
    from worker.image.worker import ImageWorker

    config = ImageWorkerConfig(
        coordinator=url,
        model="unused",
        model_config=None,
        model_name="tiny",
        name="drainer",
        identity_file=Path(tmp) / "drainer.key",
        api_key=api_key,
        pop_wait=2.0,
    )
    policy = SandboxPolicy(
        workdir_root=Path(tmp),
        extra_env={"PYTHONPATH": str(REPO_ROOT)},
        # the engine's module (this one) imports these
        packages=("sandbox", "protocol", "tests", "client", "coordinator", "worker"),
        start_timeout=60,
        job_timeout=120,
    )
    link = CoordinatorLink(url, Identity.generate(), config.name, api_key)
    sandbox = await Sandbox.create(f"{__name__}:SlowEngine", {"seconds": seconds}, policy)
    worker = ImageWorker(config, sandbox, link)
    try:
        with status_outputs(worker.status, config.identity_file):
            await run_until_signalled(worker.run(), worker.drain)
    finally:
        await worker.aclose()
        await link.aclose()
    return 0


def run_worker_process(argv: list[str]) -> int:
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    url, api_key, tmp, seconds = argv
    return asyncio.run(_worker_main(url, api_key, tmp, float(seconds)))


class WorkerProcess:
    def __init__(self, url: str, api_key: str, tmp: Path, seconds: float) -> None:
        self.log = tmp / "worker.log"
        self._out = self.log.open("wb")
        code = (
            "import sys; from tests.worker.image.test_drain import run_worker_process; "
            "sys.exit(run_worker_process(sys.argv[1:]))"
        )
        self.popen = subprocess.Popen(
            [sys.executable, "-c", code, url, api_key, str(tmp), str(seconds)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, text: str, seconds: float = 20) -> None:
        async with asyncio.timeout(seconds):
            while text not in self.output():
                assert self.popen.poll() is None, self.output()
                await asyncio.sleep(0.05)

    async def exited(self, seconds: float = 20) -> int:
        async with asyncio.timeout(seconds):
            while True:
                code = self.popen.poll()
                if code is not None:
                    return code
                await asyncio.sleep(0.05)

    def close(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        self._out.close()


# a worker process starts (imports torch, loads the model) before it leases: slow on a busy
# machine, and not what these tests measure
STARTUP = 90.0


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[LiveApp]:
    """A real coordinator on 127.0.0.1 (SQLite); leases long enough that only the worker's
    own give-back requeues a job."""
    config = CoordinatorConfig(data_dir=tmp_path / "data", port=0, lease_timeout=300)
    runner, app = await start_app(config)
    try:
        yield app
    finally:
        await runner.cleanup()


async def _until(
    client: AsyncClient, job_id: str, ok: Callable[[JobStatus], bool], seconds: float = 20
) -> JobStatus:
    async with asyncio.timeout(seconds):
        while True:
            status = await client.job(job_id)
            if ok(status):
                return status
            await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_one_sigterm_finishes_the_job_then_exits_0(live: LiveApp, tmp_path: Path) -> None:
    owner, requester = await register_accounts(live.url, "owner", "requester")
    async with AsyncClient(live.url, requester) as grid:
        first = await grid.submit_image(ImageParams(**SMALL))
        worker = WorkerProcess(live.url, owner, tmp_path, seconds=3)
        try:
            await _until(grid, first.id, lambda s: s.state == "leased" and s.step >= 1, STARTUP)
            # waiting work the worker must not take once it drains
            second = await grid.submit_image(ImageParams(**{**SMALL, "seed": 4}))
            worker.popen.send_signal(signal.SIGTERM)
            await worker.wait_for(f"draining: finishing job {first.id}, then stopping")
            assert await worker.exited() == 0, worker.output()
        finally:
            worker.close()
        done = await grid.job(first.id)
        assert done.state == "done" and done.attempts == 0
        left = await grid.job(second.id)
        assert left.state == "queued" and left.attempts == 0
    async with AsyncClient(live.url, owner) as paid:
        me = await paid.me()
        assert me.earned + me.pending == first.kudos_cost
    assert "worker shutting down" not in worker.output()
    assert not (tmp_path / "drainer.status.json").exists()


@pytest.mark.slow
async def test_second_signal_gives_the_job_back_at_once(live: LiveApp, tmp_path: Path) -> None:
    owner, requester = await register_accounts(live.url, "owner", "requester")
    async with AsyncClient(live.url, requester) as grid:
        job = await grid.submit_image(ImageParams(**SMALL))
        worker = WorkerProcess(live.url, owner, tmp_path, seconds=120)
        try:
            await _until(grid, job.id, lambda s: s.state == "leased" and s.step >= 1, STARTUP)
            # Ctrl-C in a terminal: SIGINT to the worker's process group
            os.killpg(worker.popen.pid, signal.SIGINT)
            await worker.wait_for(f"draining: finishing job {job.id}")
            os.killpg(worker.popen.pid, signal.SIGINT)
            back = await _until(grid, job.id, lambda s: s.state != "leased", seconds=10)
            assert back.state == "queued" and back.attempts == 1
            assert back.error is not None and "shutting down" in back.error
            assert await worker.exited() == 0, worker.output()
        finally:
            worker.close()
    async with AsyncClient(live.url, owner) as unpaid:
        me = await unpaid.me()
        assert me.earned + me.pending == 0


async def test_drain_ends_a_pop_still_waiting_for_work() -> None:
    """An idle worker stops at once: its long-poll for work is dropped."""
    drain = Drain()
    asked = asyncio.Event()

    async def pop_waiting_for_work() -> str:
        asked.set()
        await asyncio.Event().wait()
        return "never"

    waiting = asyncio.ensure_future(drain.unless_draining(pop_waiting_for_work()))
    await asked.wait()
    drain.start()
    async with asyncio.timeout(5):
        assert await waiting is None


async def test_a_job_already_popped_is_kept_when_the_drain_starts() -> None:
    drain = Drain()

    async def popped() -> str:
        drain.start()  # the signal lands as the job arrives
        return "job-1"

    assert await drain.unless_draining(popped()) == "job-1"
