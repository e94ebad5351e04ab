"""Results as raw PNG uploads: the largest allowed result is accepted and paid; hostile or
broken uploads are refused with a clear 400/413 naming the field, pay nothing, leave no
file behind, and the job can still be finished; a refused worker gives its job back."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from client.api import AiohttpTransport, Request, Response
from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.jobs.png_check import byte_limit
from protocol.messages import (
    IMAGE_SEED_HEADER,
    IMAGE_SHA256_HEADER,
    IMAGE_SIGNATURE_HEADER,
    LeasedJob,
)
from protocol.params import ImageParams
from protocol.signing import sha256_hex
from sandbox import Sandbox, SandboxPolicy
from tests.conftest import LiveApp, start_app
from tests.fakes import CAPS, FakeWorker, job_pngs, png
from worker.common.link import Capabilities
from worker.image.config import ImageWorkerConfig
from worker.image.worker import ImageWorker

REPO_ROOT = Path(__file__).resolve().parents[3]
SMALL: dict[str, Any] = {
    "prompt": "a red cube",
    "width": 64,
    "height": 64,
    "steps": 4,
    "seed": 11,
    "n": 2,
}
LARGEST: dict[str, Any] = {
    "prompt": "a wide field",
    "width": 2048,
    "height": 2048,
    "steps": 1,
    "n": 10,
}
BIG_CAPS = Capabilities(models=["tiny"], max_pixels=2048 * 2048, max_steps=50)


@pytest.fixture
async def live(coordinator_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    # No spot checks: a check would be a second job in the queue of these tests.
    config = dataclasses.replace(coordinator_config, spot_check_rate=0.0)
    runner, app = await start_app(config)
    try:
        yield app
    finally:
        await runner.cleanup()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _raw_png(width: int, height: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def _zeros_bomb(width: int, height: int, megabytes: int) -> bytes:
    """A small PNG of `width` x `height` whose image data inflates to `megabytes` MB."""
    deflate = zlib.compressobj(9)
    block = bytes(1024 * 1024)
    idat = b"".join(deflate.compress(block) for _ in range(megabytes)) + deflate.flush()
    return _raw_png(width, height, idat)


def _headers(worker: FakeWorker, image: dict[str, Any]) -> dict[str, str]:
    assert worker.link.token is not None
    return {
        "X-Worker-Token": worker.link.token,
        "Content-Type": "image/png",
        IMAGE_SEED_HEADER: str(image["seed"]),
        IMAGE_SHA256_HEADER: image["sha256"],
        IMAGE_SIGNATURE_HEADER: image["signature"],
    }


async def _put(
    url: str, data: bytes | Callable[[], AsyncIterator[bytes]], headers: dict[str, str]
) -> tuple[int, Any, dict[str, str]]:
    body: Any = io.BytesIO(data) if isinstance(data, bytes) else data()
    async with aiohttp.ClientSession() as http, http.put(url, data=body, headers=headers) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def _upload_bad(
    live: LiveApp, worker: FakeWorker, job: LeasedJob, body: bytes, **image: Any
) -> tuple[int, Any]:
    """Upload `body` as image 0 of the job; headers describe `body` unless overridden."""
    index = image.pop("index", 0)
    signed = worker.link.signed_image(
        job, 0, image.pop("seed", job.params.seeds()[0]), image.pop("sha256", sha256_hex(body))
    )
    headers = _headers(worker, signed) | image.pop("headers", {})
    url = f"{live.url}/api/v1/jobs/{job.id}/images/{index}"
    status, answer, _ = await _put(url, body, headers)
    return status, answer


async def _finish_partly(live: LiveApp, worker: FakeWorker, job: LeasedJob) -> tuple[int, Any]:
    """Upload image 0 only, then ask to be paid for both."""
    pngs = job_pngs(job)
    await worker.link.upload_image(job, 0, job.params.seeds()[0], pngs[0])
    images = [
        worker.link.signed_image(job, i, seed, sha256_hex(data))
        for i, (seed, data) in enumerate(zip(job.params.seeds(), pngs, strict=True))
    ]
    return await _finalize(live, worker, job, images)


async def _finish_with_other_hash(
    live: LiveApp, worker: FakeWorker, job: LeasedJob
) -> tuple[int, Any]:
    """Upload both images, then claim image 0 had another (validly signed) hash."""
    seeds, pngs = job.params.seeds(), job_pngs(job)
    for i, (seed, data) in enumerate(zip(seeds, pngs, strict=True)):
        await worker.link.upload_image(job, i, seed, data)
    images = [
        worker.link.signed_image(job, 0, seeds[0], sha256_hex(png(999))),
        worker.link.signed_image(job, 1, seeds[1], sha256_hex(pngs[1])),
    ]
    return await _finalize(live, worker, job, images)


async def _finalize(
    live: LiveApp, worker: FakeWorker, job: LeasedJob, images: list[dict[str, Any]]
) -> tuple[int, Any]:
    assert worker.link.token is not None
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{live.url}/api/v1/jobs/{job.id}/result",
            json={"images": images},
            headers={"X-Worker-Token": worker.link.token},
        ) as resp,
    ):
        return resp.status, await resp.json()


async def _streamed_too_much() -> AsyncIterator[bytes]:
    """A chunked body (no Content-Length) that goes on past the limit."""
    head = png(11)
    yield head
    for _ in range(byte_limit(64, 64) // 65536 + 2):
        yield bytes(65536)


Case = Callable[[LiveApp, FakeWorker, LeasedJob], Awaitable[tuple[int, Any]]]
GOOD_PNG = png(11)
CASES: dict[str, tuple[Case, int, str, str]] = {
    # name: (the bad request, status, field named, words in the message)
    "wrong dimensions": (
        lambda live, w, job: _upload_bad(live, w, job, png(11, 32, 64)),
        400,
        "body",
        "32x64",
    ),
    "truncated png": (
        lambda live, w, job: _upload_bad(live, w, job, GOOD_PNG[: len(GOOD_PNG) - 30]),
        400,
        "body",
        "cannot be decoded",
    ),
    "not a png": (
        lambda live, w, job: _upload_bad(live, w, job, b"GIF89a" + bytes(200)),
        400,
        "body",
        "not a PNG",
    ),
    "png declaring 50000x50000": (
        lambda live, w, job: _upload_bad(live, w, job, _raw_png(50000, 50000, b"")),
        400,
        "body",
        "50000x50000",
    ),
    "png of compressed zeros": (
        lambda live, w, job: _upload_bad(live, w, job, _zeros_bomb(64, 64, 64)),
        400,
        "body",
        "decompression bomb",
    ),
    "body over the limit": (
        lambda live, w, job: _upload_bad(live, w, job, bytes(byte_limit(64, 64) + 1)),
        413,
        "body",
        "at most",
    ),
    "streamed body over the limit": (
        lambda live, w, job: _upload_streamed(live, w, job),
        413,
        "body",
        "over the limit",
    ),
    "hash of other bytes": (
        lambda live, w, job: _upload_bad(live, w, job, GOOD_PNG, sha256=sha256_hex(png(12))),
        400,
        IMAGE_SHA256_HEADER,
        "does not match",
    ),
    "bad signature": (
        lambda live, w, job: _upload_bad(
            live, w, job, GOOD_PNG, headers={IMAGE_SIGNATURE_HEADER: "ab" * 64}
        ),
        401,
        IMAGE_SIGNATURE_HEADER,
        "does not verify",
    ),
    "wrong seed": (
        lambda live, w, job: _upload_bad(live, w, job, GOOD_PNG, seed=12),
        400,
        IMAGE_SEED_HEADER,
        "must use seed 11",
    ),
    "missing seed": (
        lambda live, w, job: _upload_bad(live, w, job, GOOD_PNG, headers={IMAGE_SEED_HEADER: ""}),
        400,
        IMAGE_SEED_HEADER,
        "missing or malformed",
    ),
    "not image/png": (
        lambda live, w, job: _upload_bad(
            live, w, job, GOOD_PNG, headers={"Content-Type": "application/json"}
        ),
        400,
        "Content-Type",
        "image/png",
    ),
    "index out of range": (
        lambda live, w, job: _upload_bad(live, w, job, GOOD_PNG, index=2),
        400,
        "index",
        "no image 2",
    ),
    "image missing at finalize": (_finish_partly, 400, "images[1]", "was not uploaded"),
    "finalize with another hash": (
        _finish_with_other_hash,
        400,
        "images[0].sha256",
        "uploaded image 0",
    ),
}


async def _upload_streamed(live: LiveApp, worker: FakeWorker, job: LeasedJob) -> tuple[int, Any]:
    signed = worker.link.signed_image(job, 0, 11, sha256_hex(GOOD_PNG))
    url = f"{live.url}/api/v1/jobs/{job.id}/images/0"
    status, answer, _ = await _put(url, _streamed_too_much, _headers(worker, signed))
    return status, answer


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
async def test_bad_upload_is_refused_pays_nothing_and_the_job_can_still_finish(
    live: LiveApp, coordinator_config: CoordinatorConfig, case: str
) -> None:
    attempt, status, field, words = CASES[case]
    async with AsyncClient(live.url) as anon:
        owner = await anon.register("owner")
        requester = await anon.register("requester")
    async with (
        FakeWorker(live.url, "uploader", owner.api_key) as worker,
        AsyncClient(live.url, requester.api_key) as alice,
        AsyncClient(live.url, owner.api_key) as bob,
    ):
        created = await alice.submit_image(ImageParams(**SMALL))
        job = await worker.link.pop(CAPS, wait=5)
        assert job is not None and job.id == created.id
        entries = (await live.store.ledger.audit())["entries"]

        got, answer = await attempt(live, worker, job)
        assert got == status, answer
        fields = {p["field"]: p["message"] for p in answer["error"]["fields"]}
        assert field in fields, answer
        assert words in answer["error"]["message"], answer
        # nothing paid, no file of the refused upload left behind
        assert (await live.store.ledger.audit())["entries"] == entries
        assert (await bob.me()).kudos == 100
        uploads = coordinator_config.data_dir / "uploads"
        assert not list(uploads.glob(".incoming-*"))
        assert (await alice.job(job.id)).state == "leased"

        # the worker can still finish the job correctly, and is paid once
        accepted = await worker.link.submit(job, job.params.seeds(), job_pngs(job))
        assert accepted.kudos_earned + accepted.kudos_held == created.kudos_cost
        assert (await alice.job(job.id)).state == "done"
        assert await alice.image(job.id, 1) == job_pngs(job)[1]
        assert (await alice.me()).kudos == 100 - created.kudos_cost
    assert not list((coordinator_config.data_dir / "uploads").iterdir())
    assert (await live.store.ledger.audit())["unbalanced_entries"] == 0


async def test_a_one_image_job_goes_up_and_is_paid_in_one_request(
    live: LiveApp, coordinator_config: CoordinatorConfig
) -> None:
    async with AsyncClient(live.url) as anon:
        owner = await anon.register("owner")
        requester = await anon.register("requester")
    async with (
        FakeWorker(live.url, "one", owner.api_key) as worker,
        AsyncClient(live.url, requester.api_key) as alice,
    ):
        # a job of two images cannot: each is uploaded, then the result names them
        two = await alice.submit_image(ImageParams(**SMALL))
        job = await worker.link.pop(CAPS, wait=5)
        assert job is not None and job.id == two.id
        image = worker.link.signed_image(job, 0, job.params.seeds()[0], sha256_hex(b"x"))
        status, answer, _ = await _put(
            f"{live.url}/api/v1/jobs/{job.id}/images/0/result", b"x", _headers(worker, image)
        )
        assert status == 400 and f"/api/v1/jobs/{job.id}/result" in answer["error"]["message"]
        await worker.link.submit(job, job.params.seeds(), job_pngs(job))

        one = await alice.submit_image(ImageParams(**(SMALL | {"n": 1})))
        job = await worker.link.pop(CAPS, wait=5)
        assert job is not None and job.id == one.id
        entries = (await live.store.ledger.audit())["entries"]
        url = f"{live.url}/api/v1/jobs/{job.id}/images/0/result"
        [good] = job_pngs(job)
        # refused as the upload is (here: a body that is not what its hash header says),
        # paying nothing and leaving no file
        image = worker.link.signed_image(job, 0, job.params.seeds()[0], sha256_hex(good))
        status, answer, _ = await _put(url, good + b"!", _headers(worker, image))
        assert status == 400 and IMAGE_SHA256_HEADER in answer["error"]["message"], answer
        assert (await live.store.ledger.audit())["entries"] == entries
        assert (await alice.job(job.id)).state == "leased"
        # then right: stored, verified and paid in this one request
        status, answer, _ = await _put(url, good, _headers(worker, image))
        assert status == 200 and answer["id"] == job.id, answer
        assert answer["kudos_earned"] + answer["kudos_held"] == one.kudos_cost
        assert (await alice.job(job.id)).state == "done"
        assert await alice.image(job.id, 0) == good
        # paid once: the same request again finds the job no longer leased
        status, answer, _ = await _put(url, good, _headers(worker, image))
        assert status == 409, answer
    # no upload marker or temporary file was left
    assert not list((coordinator_config.data_dir / "uploads").iterdir())
    assert (await live.store.ledger.audit())["unbalanced_entries"] == 0


async def test_an_image_stored_already_is_checked_in_memory(
    live: LiveApp, coordinator_config: CoordinatorConfig
) -> None:
    async with AsyncClient(live.url) as anon:
        owner = await anon.register("owner")
        requester = await anon.register("requester")
    one = ImageParams(**(SMALL | {"n": 1}))
    async with (
        FakeWorker(live.url, "same", owner.api_key) as worker,
        AsyncClient(live.url, requester.api_key) as alice,
    ):
        await alice.submit_image(one)
        job = await worker.link.pop(CAPS, wait=5)
        assert job is not None
        [first] = job_pngs(job)
        await worker.link.submit(job, job.params.seeds(), [first])
        # the same params and seed make the same PNG: stored already, so no temporary
        # file is needed (the spool's folder is made unusable to show it)
        uploads = coordinator_config.data_dir / "uploads"
        uploads.rmdir()
        uploads.write_bytes(b"not a folder")
        try:
            created = await alice.submit_image(one)
            job = await worker.link.pop(CAPS, wait=5)
            assert job is not None and job.id == created.id
            assert job_pngs(job) == [first]
            image = worker.link.signed_image(job, 0, job.params.seeds()[0], sha256_hex(first))
            url = f"{live.url}/api/v1/jobs/{job.id}/images/0/result"
            # still refused when the body is not what it claims
            status, answer, _ = await _put(url, first[:-1] + b"!", _headers(worker, image))
            assert status == 400 and IMAGE_SHA256_HEADER in answer["error"]["message"], answer
            status, answer, _ = await _put(url, first, _headers(worker, image))
            assert status == 200, answer
            assert (await alice.job(job.id)).state == "done"
            assert await alice.image(job.id, 0) == first
            # and checked as any: a stored 64x64 image is no image of a 128x128 job
            created = await alice.submit_image(ImageParams(**(SMALL | {"n": 1, "width": 128})))
            job = await worker.link.pop(CAPS, wait=5)
            assert job is not None and job.id == created.id
            image = worker.link.signed_image(job, 0, job.params.seeds()[0], sha256_hex(first))
            url = f"{live.url}/api/v1/jobs/{job.id}/images/0/result"
            status, answer, _ = await _put(url, first, _headers(worker, image))
            assert status == 400 and "128x64" in answer["error"]["message"], answer
        finally:
            uploads.unlink()
            uploads.mkdir()
    assert (await live.store.ledger.audit())["unbalanced_entries"] == 0


class _OlderCoordinator(AiohttpTransport):
    """The network, but the one-request finish answers 404 as a coordinator older than it
    does; counts what was asked."""

    def __init__(self) -> None:
        super().__init__(connect_timeout=10)
        self.paths: list[str] = []

    async def send(self, request: Request) -> Response:
        self.paths.append(f"{request.method} {request.path}")
        if request.path.endswith("/images/0/result"):
            return Response(404, {}, b'{"error": {"message": "Not Found"}}')
        return await super().send(request)


async def test_a_worker_finishes_in_two_requests_with_an_older_coordinator(
    live: LiveApp,
) -> None:
    async with AsyncClient(live.url) as anon:
        owner = await anon.register("owner")
        requester = await anon.register("requester")
    older = _OlderCoordinator()
    async with (
        FakeWorker(live.url, "old", owner.api_key, transport=older) as worker,
        AsyncClient(live.url, requester.api_key) as alice,
    ):
        for _ in range(2):
            created = await alice.submit_image(ImageParams(**(SMALL | {"n": 1})))
            job = await worker.link.pop(CAPS, wait=5)
            assert job is not None and job.id == created.id
            accepted = await worker.link.submit(job, job.params.seeds(), job_pngs(job))
            assert accepted.kudos_earned + accepted.kudos_held == created.kudos_cost
            assert (await alice.job(job.id)).state == "done"
    finals = [p for p in older.paths if p.endswith("/result")]
    # asked once, then upload + result for both jobs
    assert [p.split("/")[-1] for p in finals] == ["result", "result", "result"]
    assert finals[0].startswith("PUT ") and all(p.startswith("POST ") for p in finals[1:])


async def test_largest_result_is_accepted_paid_and_served_with_nosniff(
    live: LiveApp, coordinator_config: CoordinatorConfig
) -> None:
    """Ten 2048x2048 PNGs stored without compression: the largest result there is."""
    async with AsyncClient(live.url) as anon:
        owner = await anon.register("owner")
        requester = await anon.register("requester")
    async with (
        FakeWorker(live.url, "big", owner.api_key) as worker,
        AsyncClient(live.url, requester.api_key) as alice,
        AsyncClient(live.url, owner.api_key) as bob,
    ):
        created = await alice.submit_image(ImageParams(**LARGEST, seed=1))
        job = await worker.link.pop(BIG_CAPS, wait=5)
        assert job is not None and job.id == created.id
        pngs = job_pngs(job, compress_level=0)
        assert all(byte_limit(2048, 2048) > len(p) > 12_000_000 for p in pngs)
        accepted = await worker.link.submit(job, job.params.seeds(), pngs)
        assert accepted.kudos_earned + accepted.kudos_held == created.kudos_cost == 80
        assert (await alice.me()).kudos == 100 - 80
        paid = await bob.me()
        assert paid.kudos + paid.pending == 100 + 80
        status = await alice.job(job.id)
        assert status.state == "done" and len(status.images) == 10
        assert [image.sha256 for image in status.images] == [sha256_hex(p) for p in pngs]
        async with (
            aiohttp.ClientSession(headers={"apikey": requester.api_key}) as http,
            http.get(status.images[9].url) as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "image/png"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert await resp.read() == pngs[9]
    assert (await live.store.ledger.audit())["unbalanced_entries"] == 0
    assert not list((coordinator_config.data_dir / "uploads").iterdir())


async def test_json_body_arriving_in_pieces_is_read_whole(live: LiveApp) -> None:
    """A JSON body near the limit, sent slowly in small chunks, is read to its end."""
    body = (ImageParams(prompt="a red cube", width=64, height=64).model_dump_json()).encode()
    padded = body + b" " * (60_000 - len(body))

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(padded), 4096):
            yield padded[start : start + 4096]
            await asyncio.sleep(0)

    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{live.url}/api/v1/jobs/image", data=pieces()) as resp,
    ):
        assert resp.status == 202, await resp.text()


async def test_refused_result_is_given_back_at_once(live: LiveApp, tmp_path: Path) -> None:
    """A real image worker (real sandbox, fake engine drawing the wrong size) whose upload
    is refused gives the job back at once instead of holding it until its lease ends."""
    async with AsyncClient(live.url) as anon:
        created = await anon.submit_image(ImageParams(**{**SMALL, "n": 1}))
    policy = SandboxPolicy(
        workdir_root=tmp_path,
        extra_env={"PYTHONPATH": str(REPO_ROOT)},
        start_timeout=60,
        job_timeout=60,
        # tests.fakes (the engine's module) imports the SDK and the worker's link
        packages=("sandbox", "protocol", "tests", "client", "worker"),
    )
    config = ImageWorkerConfig(
        coordinator=live.url,
        model="unused",
        model_config=None,
        model_name="tiny",
        name="wrongsize",
        identity_file=tmp_path / "id.key",
        max_pixels=512 * 512,
    )
    sandbox = await Sandbox.create("tests.fakes:FakeImageEngine", {"size": [32, 32]}, policy)
    worker = FakeWorker(live.url, "wrongsize")
    image_worker = ImageWorker(config, sandbox, worker.link)
    try:
        await worker.link.register()
        job = await worker.link.pop(image_worker.capabilities, wait=5)
        assert job is not None and job.id == created.id
        await image_worker.serve(job)
        async with AsyncClient(live.url) as anon:
            status = await anon.job(created.id)
        assert status.state == "queued" and status.attempts == 1
        assert status.error is not None and "result refused" in status.error
        assert "32x32" in status.error
        assert image_worker.jobs_done == 0
    finally:
        await image_worker.aclose()
        await worker.link.aclose()
    assert (await live.store.ledger.audit())["unbalanced_entries"] == 0
