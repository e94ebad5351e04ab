"""Two real `idlegrid coordinator` processes with different data directories on one
PostgreSQL database and `--file-store database`: what either stores, both serve.

A worker uploads to one and may finish the job on the other (the upload markers are
shared too); every image then comes byte-identical from both, by the native URL and by
the AI Horde one, and neither data directory holds an image.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from client.sdk import AsyncClient
from coordinator.http.jobs import IMAGE_CSP
from protocol.params import ImageParams
from protocol.signing import sha256_hex
from tests.conftest import POSTGRES_URL, _drop_postgres_database, _postgres_database
from tests.fakes import CAPS, FakeWorker, job_pngs, register_accounts
from tests.procs import Proc

JOBS = 3


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    created = await _postgres_database()
    if created is None:
        pytest.skip(f"no PostgreSQL server reachable at {POSTGRES_URL}")
    name, url = created
    try:
        yield url
    finally:
        await _drop_postgres_database(name)


@pytest.fixture
def coordinators(tmp_path: Path, postgres_url: str) -> Iterator[list[str]]:
    """The URLs of two coordinators, data in <tmp>/a and <tmp>/b, one database."""
    started: list[Proc] = []
    urls = []
    try:
        for name in ("a", "b"):
            proc = Proc(
                [
                    "coordinator",
                    "--port",
                    "0",
                    "--data-dir",
                    str(tmp_path / name),
                    "--database-url",
                    postgres_url,
                    "--file-store",
                    "database",
                ],
                tmp_path / f"{name}.log",
            )
            started.append(proc)
            urls.append(proc.wait_for(r"listening on (http://\S+)", 90).group(1))
        yield urls
    finally:
        for proc in started:
            proc.stop()


async def _get(url: str, key: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.get(url, headers={"apikey": key}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(240)
async def test_coordinators_on_one_database_serve_each_others_images(
    coordinators: list[str], tmp_path: Path
) -> None:
    a, b = coordinators
    owner, requester = await register_accounts(a, "owner", "requester")
    expected: dict[tuple[str, int], bytes] = {}
    async with AsyncClient(a, requester) as alice, FakeWorker(a, "shared-files", owner) as worker:
        for number in range(JOBS):
            params = ImageParams(prompt="x", width=512, height=512, steps=4, n=2, seed=number)
            created = await alice.submit_image(params)
            job = await worker.link.pop(CAPS, wait=10)
            assert job is not None and job.id == created.id
            # uncompressed: each image spans two of the database's chunks
            pngs = job_pngs(job, compress_level=0)
            images = []
            for index, (seed, png) in enumerate(zip(job.params.seeds(), pngs, strict=True)):
                await worker.link.upload_image(job, index, seed, png)
                images.append(worker.link.signed_image(job, index, seed, sha256_hex(png)))
                expected[job.id, index] = png
            # the last job is finished on the other coordinator than it was uploaded to
            worker.link.base_url = b if number == JOBS - 1 else a
            await worker.link.finish(job, images)
            worker.link.base_url = a
    assert len(expected) == JOBS * 2

    for url in (a, b):
        async with AsyncClient(url, requester) as client:
            for (job_id, index), png in expected.items():
                assert await client.image(job_id, index) == png
                image_url = f"{url}/api/v1/jobs/{job_id}/images/{index}"
                status, headers, body = await _get(image_url, requester)
                assert status == 200 and body == png
                assert headers["Content-Security-Policy"] == IMAGE_CSP
                assert headers["Cache-Control"] == "private, max-age=31536000"
        for job_id in {job_id for job_id, _ in expected}:
            status, _, raw = await _get(f"{url}/api/v2/generate/status/{job_id}", requester)
            assert status == 200, raw
            generations = json.loads(raw)["generations"]
            assert len(generations) == 2
            for index, generation in enumerate(generations):
                assert generation["img"].startswith(url)
                status, headers, body = await _get(generation["img"], requester)
                assert status == 200 and body == expected[job_id, index]
                assert headers["Content-Type"] == "image/png"
                assert headers["X-Content-Type-Options"] == "nosniff"
                assert headers["Content-Length"] == str(len(body))
    # nothing in the data directories but (empty) spools
    for name in ("a", "b"):
        stored = [p for p in (tmp_path / name).rglob("*") if p.is_file() and p.suffix == ".png"]
        assert stored == []
