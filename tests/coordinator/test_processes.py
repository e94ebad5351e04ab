"""`idlegrid coordinator --processes N`: N real processes on one port and one PostgreSQL.

Job changes cross processes by LISTEN/NOTIFY (the poll fallback is set far above what the
tests wait, so only a notification explains a fast update), rate limits are shared, and
the children live and die with their parent.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.jobs.notify import NotifyBridge, asyncpg_dsn
from coordinator.jobs.signals import Signals
from protocol.params import ImageParams
from tests.conftest import POSTGRES_URL, _drop_postgres_database, _postgres_database
from tests.fakes import CAPS, FakeWorker
from tests.procs import Proc

POLL_FALLBACK = 30.0
PROCESS_HEADER = "X-Coordinator-Process"
POP = {"models": CAPS.models, "max_pixels": CAPS.max_pixels, "max_steps": CAPS.max_steps}


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    created = await _postgres_database()
    if created is None:
        pytest.skip(f"no PostgreSQL server reachable at {POSTGRES_URL}")
    name, url = created
    try:
        yield url
    finally:
        await _drop_postgres_database(name)


def _start(tmp: Path, *args: str, name: str = "coordinator") -> tuple[Proc, str]:
    proc = Proc(
        ["coordinator", "--port", "0", "--data-dir", str(tmp / "data"), *args],
        tmp / f"{name}.log",
    )
    try:
        url = proc.wait_for(r"listening on (http://\S+)", 90).group(1)
    except BaseException:
        proc.stop()
        raise
    return proc, url


def _children(proc: Proc) -> list[psutil.Process]:
    """The coordinator processes a --processes parent started (not multiprocessing's helper)."""
    return [
        child
        for child in psutil.Process(proc.pid).children()
        if "resource_tracker" not in " ".join(child.cmdline())
    ]


def _gone(pid: int) -> bool:
    try:
        status: str = psutil.Process(pid).status()
        zombie: str = psutil.STATUS_ZOMBIE
        return status == zombie
    except psutil.NoSuchProcess:
        return True


async def _call(
    method: str, url: str, headers: dict[str, str] | None = None, body: object = None
) -> tuple[int, str, str]:
    """One request on a new connection (so the kernel may pick either process): status,
    answering process, body."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        http.request(method, url, headers=headers, json=body) as resp,
    ):
        return resp.status, resp.headers[PROCESS_HEADER], await resp.text()


async def _next_status(stream: aiohttp.StreamReader) -> dict[str, object]:
    event = None
    async for raw in stream:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event == "status":
            status: dict[str, object] = json.loads(line.removeprefix("data: "))
            return status
    raise AssertionError("the event stream ended")


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(180)
async def test_two_processes_share_the_port_job_changes_and_rate_limits(
    tmp_path: Path, postgres_url: str
) -> None:
    proc, url = await asyncio.to_thread(
        _start,
        tmp_path,
        "--processes",
        "2",
        "--database-url",
        postgres_url,
        "--poll-fallback",
        str(POLL_FALLBACK),
        "--rate-limit",
        "pop=0.001/6,1000/1000",
    )
    try:
        assert len(_children(proc)) == 2
        # both processes serve the one port
        answered = {(await _call("GET", f"{url}/healthz"))[1] for _ in range(40)}
        assert len(answered) == 2, answered
        assert {a.split(":")[1] for a in answered} == {str(c.pid) for c in _children(proc)}

        async with AsyncClient(url) as anon:
            key = (await anon.register("alice")).api_key
        async with AsyncClient(url, key) as alice:
            params = ImageParams(prompt="x", width=64, height=64, steps=30, n=1, seed=1)
            job_id = (await alice.submit_image(params)).id
        async with FakeWorker(url, "streamer") as worker:
            job = await worker.link.pop(CAPS, wait=10)
            assert job is not None and job.id == job_id
            token = worker.link.token
            assert token is not None
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{url}/api/v1/jobs/{job_id}/events", headers={"apikey": key}) as events,
            ):
                streamer = events.headers[PROCESS_HEADER]
                assert (await _next_status(events.content))["state"] == "leased"
                # report progress until the other process takes a report
                for step in range(1, 31):
                    posted = time.monotonic()
                    status, poster, text = await _call(
                        "POST",
                        f"{url}/api/v1/jobs/{job_id}/progress",
                        {"X-Worker-Token": token},
                        {"image": 0, "step": step, "steps": 30},
                    )
                    assert status == 200, text
                    if poster != streamer:
                        break
                else:
                    raise AssertionError(f"every report went to process {streamer}")
                async with asyncio.timeout(POLL_FALLBACK / 3):
                    while (await _next_status(events.content))["step"] != step:
                        pass
                seen = time.monotonic() - posted
            assert seen < 3.0, f"progress reached the other process's stream after {seen:.1f} s"

        # the pop limit (burst 6 per worker) holds across both processes together
        async with FakeWorker(url, "limited") as limited:
            token = limited.link.token
            assert token is not None
            pop = f"{url}/api/v1/workers/pop"
            headers, body = {"X-Worker-Token": token}, {**POP, "wait": 0}
            outcomes = [await _call("POST", pop, headers, body) for _ in range(16)]
        assert {p for _, p, _ in outcomes} == answered  # both processes were asked
        assert [s for s, _, _ in outcomes].count(200) == 6, outcomes
        assert [s for s, _, _ in outcomes].count(429) == 10, outcomes
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0, proc.output()
    output = proc.output()
    assert "[0:" in output and "[1:" in output  # each child logs with its index


@pytest.mark.slow
async def test_more_processes_on_sqlite_is_refused(tmp_path: Path) -> None:
    proc = Proc(
        ["coordinator", "--port", "0", "--data-dir", str(tmp_path), "--processes", "2"],
        tmp_path / "coordinator.log",
    )
    try:
        code = await asyncio.to_thread(proc.popen.wait, 60)
    finally:
        proc.stop()
    assert code != 0
    output = proc.output()
    assert "--processes 2 needs PostgreSQL" in output and "--database-url" in output, output
    assert "listening" not in output


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(180)
async def test_children_stop_with_sigterm_and_die_with_their_parent(
    tmp_path: Path, postgres_url: str
) -> None:
    args = ("--processes", "2", "--database-url", postgres_url)
    proc, _ = await asyncio.to_thread(_start, tmp_path, *args, name="sigterm")
    children = _children(proc)
    assert len(children) == 2
    assert await asyncio.to_thread(proc.stop) == 0, proc.output()
    assert all(_gone(c.pid) for c in children)

    proc, url = await asyncio.to_thread(_start, tmp_path, *args, name="sigkill")
    try:
        children = _children(proc)
        assert len(children) == 2
        os.kill(proc.pid, signal.SIGKILL)  # the parent alone, not its process group
        deadline = time.monotonic() + 20
        while not all(_gone(c.pid) for c in children):
            assert time.monotonic() < deadline, f"orphans still running:\n{proc.output()}"
            await asyncio.sleep(0.1)
        with pytest.raises(aiohttp.ClientConnectionError):
            await _call("GET", f"{url}/healthz")
    finally:
        await asyncio.to_thread(proc.stop)


@pytest.mark.postgres
async def test_notify_bridge_carries_changes_between_processes(
    tmp_path: Path, postgres_url: str
) -> None:
    assert asyncpg_dsn("postgresql+asyncpg://u:p@h:5/db") == "postgresql://u:p@h:5/db"
    config = CoordinatorConfig(data_dir=tmp_path, database_url=postgres_url)
    here, there = Signals(), Signals()
    url = config.resolved_database_url
    bridges = [NotifyBridge(s, url, "idlegrid_test") for s in (here, there)]
    for bridge in bridges:
        await bridge.start()
    try:
        assert all(b.connected for b in bridges)
        with there.watch("job-1") as watch, here.watch("job-1") as mine:
            woken = asyncio.create_task(watch.wait(10))
            here.job_changed("job-1")
            started = time.monotonic()
            assert await woken
            assert time.monotonic() - started < 2
            assert await mine.wait(0)  # the local change woke the local watcher...
            await asyncio.sleep(0.2)
            assert bridges[0].received == 0  # ...and its own notification was ignored
            assert bridges[1].received == 1
        # a wait for work wakes on a queued job of its kind from the other process
        waiting = asyncio.create_task(there.wait_for_work("image", ["tiny"], 10))
        await asyncio.sleep(0.1)
        here.job_queued("image", "tiny")
        assert await waiting
        # the connection drops: the bridge reconnects and carries changes again
        old = bridges[1]._conn
        assert old is not None
        old.terminate()
        deadline = time.monotonic() + 10
        while not bridges[1].connected or bridges[1]._conn in (None, old):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        with there.watch("job-2") as watch:
            woken = asyncio.create_task(watch.wait(10))
            await asyncio.sleep(0.1)
            here.job_changed("job-2")
            assert await woken
    finally:
        for bridge in bridges:
            await bridge.stop()
    assert here.publisher is None and there.publisher is None
