"""Finding 12, "Client gives up too early": `wait()`/`complete()` re-poll outside their retry,
so a coordinator restart of more than 0.5 s ends the CLI while the job runs on, and
`sock_read=None` hangs forever on a vanished coordinator.

A real coordinator process is killed and, seconds later, started again on the same port
while `idlegrid generate` waits on its job: the command finishes with the images. A
coordinator replaced by a listener that accepts connections and never answers makes the
client give up after its wait timeout, naming the job, instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client.errors import WaitTimeout
from client.follow import READ_TIMEOUT
from client.sdk import AsyncClient
from coordinator.http.streams import KEEPALIVE_SECONDS
from protocol.params import ImageParams
from tests.fakes import CAPS, FakeWorker, job_pngs
from tests.procs import Proc

pytestmark = pytest.mark.timeout(180)

DOWN_SECONDS = 4.0
SMALL = ImageParams(prompt="a red cube", width=64, height=64, steps=4, seed=11)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _coordinator(tmp: Path, port: int, run: int) -> Proc:
    proc = Proc(
        ["coordinator", "--port", str(port), "--data-dir", str(tmp / "data")],
        tmp / f"coordinator-{run}.log",
    )
    proc.wait_for(r"listening on http://", 60)
    return proc


def _cli(tmp: Path, url: str, key: str, *args: str) -> Proc:
    return Proc(
        ["generate", "a red cube", "--size", "64x64", "--steps", "4", "--seed", "11", *args],
        tmp / "cli.log",
        env={
            "IDLEGRID_COORDINATOR": url,
            "IDLEGRID_API_KEY": key,
            "IDLEGRID_CREDENTIALS": str(tmp / "credentials.json"),
        },
    )


async def _exit_code(proc: Proc, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while proc.popen.poll() is None:
        assert time.monotonic() < deadline, f"still running:\n{proc.output()}"
        await asyncio.sleep(0.1)
    return proc.popen.returncode


@contextlib.asynccontextmanager
async def _silent_listener(port: int = 0) -> AsyncIterator[int]:
    """Accepts connections on 127.0.0.1 and never answers; yields its port."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", port, reuse_address=True)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.slow
async def test_cli_rides_out_a_coordinator_restart(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    first = _coordinator(tmp_path, port, 1)
    second: Proc | None = None
    cli: Proc | None = None
    try:
        async with AsyncClient(url) as anon:
            key = (await anon.register("patient")).api_key
        async with FakeWorker(url, "worker1") as worker:
            cli = _cli(tmp_path, url, key, "-o", str(tmp_path / "out"), "--wait-timeout", "60")
            job = await worker.link.pop(CAPS, wait=30)  # the CLI submitted and is waiting
            assert job is not None
            await asyncio.sleep(0.5)  # let it follow the job's event stream
            first.kill(signal.SIGKILL)
            first.stop()
            await asyncio.sleep(DOWN_SECONDS)
            assert cli.popen.poll() is None, f"the CLI gave up:\n{cli.output()}"
            second = await asyncio.to_thread(_coordinator, tmp_path, port, 2)
            await worker.link.submit(job, job.params.seeds(), job_pngs(job))
        assert await _exit_code(cli, 60) == 0, cli.output()
        assert (tmp_path / "out" / f"{job.id}-0.png").exists(), cli.output()
    finally:
        for proc in (cli, first, second):
            if proc is not None:
                proc.stop()


@pytest.mark.slow
async def test_cli_gives_up_on_a_vanished_coordinator_naming_the_job(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    coordinator = _coordinator(tmp_path, port, 1)
    cli: Proc | None = None
    try:
        async with AsyncClient(url) as anon:
            key = (await anon.register("stranded")).api_key
        async with FakeWorker(url, "worker1") as worker:
            cli = _cli(tmp_path, url, key, "--wait-timeout", "3")
            job = await worker.link.pop(CAPS, wait=30)
            assert job is not None
        await asyncio.sleep(0.5)
        coordinator.kill(signal.SIGKILL)
        coordinator.stop()
        # something else now holds the port: it accepts and never answers
        async with _silent_listener(port):
            started = time.monotonic()
            code = await _exit_code(cli, 60)
            waited = time.monotonic() - started
        assert code == 1, cli.output()
        assert f"gave up waiting for job {job.id}" in cli.output()
        assert waited < 3 + 10, waited
    finally:
        for proc in (cli, coordinator):
            if proc is not None:
                proc.stop()


async def test_sdk_wait_gives_up_on_a_listener_that_never_answers() -> None:
    async with _silent_listener() as port, AsyncClient(f"http://127.0.0.1:{port}") as grid:
        started = time.monotonic()
        with pytest.raises(WaitTimeout) as gave_up:
            async with asyncio.timeout(30):
                await grid.wait("job-that-waits", wait_timeout=2)
        assert "gave up waiting for job job-that-waits" in str(gave_up.value)
        assert 2 <= time.monotonic() - started < 10
    # a stream is given up only after a silence longer than the keep-alive interval
    assert READ_TIMEOUT > KEEPALIVE_SECONDS
