"""Finding 4, fake and hostile images: "only the PNG magic is checked, a PNG bomb crashes
the spot-check comparison (500, the check never concludes) or takes the process to gigabytes,
and jobs under 1e8 pixel-steps are never speed-checked"."""

from __future__ import annotations

import dataclasses
import functools
import resource
import struct
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.files import LocalFiles
from coordinator.http.state import FILES
from protocol.messages import (
    IMAGE_SEED_HEADER,
    IMAGE_SHA256_HEADER,
    IMAGE_SIGNATURE_HEADER,
    LeasedJob,
)
from protocol.params import ImageParams
from protocol.signing import sha256_hex
from tests.conftest import LiveApp, start_app
from tests.fakes import CAPS, FakeWorker, job_pngs, png, register_accounts

SMALL: dict[str, Any] = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 4, "n": 1}
# the size that was never speed-checked: 512x512, 20 steps (5.2 million pixel-steps)
DEFAULT_SIZE: dict[str, Any] = {
    "prompt": "a quick sketch",
    "width": 512,
    "height": 512,
    "steps": 20,
}
HTML_IN_PNG = b"\x89PNG<html><script>alert(document.cookie)</script></html>"


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@functools.lru_cache(maxsize=4)
def _bomb(side: int) -> bytes:
    """A greyscale side x side PNG of zeros: 20000 -> about 389 KB, 12000 -> about 140 KB."""
    deflate = zlib.compressobj(9)
    rows = bytes(side + 1) * 64  # a filter byte and `side` zero samples, 64 rows at a time
    idat = b"".join(deflate.compress(rows) for _ in range(side // 64)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


class PeakMemory:
    """The process's peak resident memory (VmHWM), reset to the current size on entry."""

    def __enter__(self) -> PeakMemory:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
        self.start = self._kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.grew_mib = (self._kib("VmHWM") - self.start) / 1024

    @staticmethod
    def _kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover


def _config(config: CoordinatorConfig, **changes: Any) -> CoordinatorConfig:
    return dataclasses.replace(
        config, trusted_accounts=frozenset({"operator"}), verify_distinct_ip=False, **changes
    )


@pytest.fixture
async def checked(coordinator_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    """Every untrusted result is spot-checked; fake workers answer at once (no speed checks)."""
    config = _config(
        coordinator_config,
        spot_check_rate=1.0,
        spot_check_min_rate=1.0,
        max_pixel_steps_per_second=float("inf"),
    )
    runner, app = await start_app(config)
    try:
        yield app
    finally:
        await runner.cleanup()


async def _put_image(url: str, worker: FakeWorker, job: LeasedJob, body: bytes) -> tuple[int, str]:
    """Upload `body` as image 0 of the job, correctly signed."""
    seed = job.params.seeds()[0]
    signed = worker.link.signed_image(job, 0, seed, sha256_hex(body))
    assert worker.link.token is not None
    headers = {
        "X-Worker-Token": worker.link.token,
        "Content-Type": "image/png",
        IMAGE_SEED_HEADER: str(seed),
        IMAGE_SHA256_HEADER: signed["sha256"],
        IMAGE_SIGNATURE_HEADER: signed["signature"],
    }
    async with (
        aiohttp.ClientSession() as http,
        http.put(f"{url}/api/v1/jobs/{job.id}/images/0", data=body, headers=headers) as resp,
    ):
        return resp.status, await resp.text()


async def test_html_in_a_png_is_refused_and_images_are_served_inert(checked: LiveApp) -> None:
    owner, alice = await register_accounts(checked.url, "owner", "alice")
    async with (
        FakeWorker(checked.url, "uploader", owner) as worker,
        AsyncClient(checked.url, alice) as requester,
    ):
        created = await requester.submit_image(ImageParams(**SMALL, seed=3))
        job = await worker.link.pop(CAPS, wait=5)
        assert job is not None and job.id == created.id
        status, answer = await _put_image(checked.url, worker, job, HTML_IN_PNG)
        assert status == 400 and "not a PNG" in answer
        for side in (12000, 20000):
            with PeakMemory() as memory:
                status, answer = await _put_image(checked.url, worker, job, _bomb(side))
            assert status == 400 and f"{side}x{side}" in answer
            assert memory.grew_mib < 200
        await worker.link.submit(job, [3], job_pngs(job))
        info = await requester.job(created.id)
        async with (
            aiohttp.ClientSession(headers={"apikey": alice}) as http,
            http.get(info.images[0].url) as resp,
        ):
            assert resp.status == 200 and await resp.read() == png(3)
            assert resp.headers["Content-Type"] == "image/png"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            policy = resp.headers.get("Content-Security-Policy", "")
            assert "default-src 'none'" in policy and "sandbox" in policy


@pytest.mark.parametrize("side", [20000, 12000])
async def test_a_bomb_reaching_the_spot_check_concludes_it_against_its_maker(
    checked: LiveApp, side: int
) -> None:
    bomb = _bomb(side)
    assert len(bomb) < 400_000
    operator, newbie_key, alice = await register_accounts(
        checked.url, "operator", "newbie", "alice"
    )
    async with (
        FakeWorker(checked.url, "referee", operator) as referee,
        FakeWorker(checked.url, "newbie", newbie_key) as newbie,
        AsyncClient(checked.url, alice) as requester,
        AsyncClient(checked.url, newbie_key) as owner,
    ):
        created = await requester.submit_image(ImageParams(**SMALL, seed=8))
        job = await newbie.link.pop(CAPS, wait=5)
        assert job is not None
        await newbie.link.submit(job, [8], job_pngs(job))
        # Whatever slipped past the upload checks (an older coordinator, a shared data
        # directory): the stored original is a bomb.
        files = checked.app[FILES]
        assert isinstance(files, LocalFiles)
        stored = files.path(sha256_hex(png(8)))
        stored.write_bytes(bomb)
        check = await referee.link.pop(CAPS, wait=5)
        assert check is not None
        # the same picture in other bytes (the stored file of png(8) is the bomb now)
        redone = png(8, compress_level=9)
        with PeakMemory() as memory:
            # a 500 here raises CoordinatorUnavailable
            verdict = await referee.link.submit(check, [8], [redone])
        assert verdict.kudos_earned > 0
        assert memory.grew_mib < 200, f"the comparison grew the process by {memory.grew_mib} MiB"
        assert newbie.link.worker_id is not None
        record = await requester.worker(newbie.link.worker_id)
        assert (record.checks_failed, record.suspicion) == (1, 1)
        assert (await owner.me()).pending == 0  # forfeited
        # the requester gets the referee's image instead of the bomb
        assert await requester.image(created.id, 0) == redone
        assert await referee.link.pop(CAPS, wait=0) is None  # concluded: no second check


async def test_jobs_of_the_default_size_are_speed_checked(
    coordinator_config: CoordinatorConfig,
) -> None:
    config = _config(coordinator_config, spot_check_rate=0.0, spot_check_min_rate=0.0)
    runner, app = await start_app(config)
    clock = [time.time()]
    app.store.db.clock = lambda: clock[0]
    try:
        operator, alice = await register_accounts(app.url, "operator", "alice")
        async with (
            FakeWorker(app.url, "sprinter") as sprinter,
            FakeWorker(app.url, "steady") as steady,
            FakeWorker(app.url, "juggler") as juggler,
            FakeWorker(app.url, "referee", operator) as referee,
            AsyncClient(app.url, alice) as requester,
        ):

            async def suspicion(worker: FakeWorker) -> int:
                assert worker.link.worker_id is not None
                return (await requester.worker(worker.link.worker_id)).suspicion

            async def serve(worker: FakeWorker, job: LeasedJob | None, seconds: float) -> None:
                assert job is not None
                clock[0] += seconds
                await worker.link.submit(job, job.params.seeds(), job_pngs(job))

            # An answer in no time at all: no GPU makes 512x512 in 20 steps that fast.
            await requester.submit_image(ImageParams(**DEFAULT_SIZE, seed=1))
            await serve(sprinter, await sprinter.link.pop(CAPS, wait=5), 0.0)
            assert await suspicion(sprinter) == 1
            check = await referee.link.pop(CAPS, wait=5)
            assert check is not None  # checked although the spot-check rate is 0
            await referee.link.submit(check, check.params.seeds(), job_pngs(check))

            # A fast honest GPU (one second) is not suspected.
            await requester.submit_image(ImageParams(**DEFAULT_SIZE, seed=2))
            await serve(steady, await steady.link.pop(CAPS, wait=5), 1.0)
            assert await suspicion(steady) == 0

            # Leasing many jobs at once does not buy time: the second answer came a
            # millisecond after the first, whatever its lease says.
            for seed in (3, 4):
                await requester.submit_image(ImageParams(**DEFAULT_SIZE, seed=seed))
            first = await juggler.link.pop(CAPS, wait=5)
            second = await juggler.link.pop(CAPS, wait=5)
            await serve(juggler, first, 1.0)
            assert await suspicion(juggler) == 0
            await serve(juggler, second, 0.001)
            assert await suspicion(juggler) == 1
    finally:
        await runner.cleanup()
