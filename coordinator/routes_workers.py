"""The worker side: register, pop (long-poll), progress, result, failure."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time

from aiohttp import web

from coordinator.api import API, Call
from coordinator.errors import BadRequest, Conflict, Unauthorized
from coordinator.polling import long_poll
from coordinator.routes_jobs import job_status
from coordinator.state import CONFIG, FILES, SIGNALS, STORE
from coordinator.store import Job, ResultRecord, Worker
from coordinator.verification import images_agree, same_build
from protocol.errors import SignatureInvalid
from protocol.messages import (
    FailureReport,
    JobStatus,
    LeasedJob,
    LeaseExtended,
    PopRequest,
    PopResponse,
    ProgressReport,
    ResultAccepted,
    ResultSubmit,
    WorkerRegister,
    WorkerRegistered,
)
from protocol.signing import registration_message, result_message, sha256_hex, verify

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLOCK_SKEW_SECONDS = 300


@API.route(
    "POST",
    "/api/v1/workers/register",
    summary="Register a worker identity (Ed25519); with an API key its earnings go to that account",
    body=WorkerRegister,
    response=WorkerRegistered,
    auth="optional",
)
async def register_worker(request: web.Request, call: Call) -> WorkerRegistered:
    body: WorkerRegister = call.body
    if abs(time.time() - body.timestamp) > CLOCK_SKEW_SECONDS:
        raise BadRequest(
            "timestamp is more than 5 minutes off the coordinator's clock; fix the worker's clock",
            [("timestamp", "must be within 5 minutes of the coordinator's clock")],
        )
    try:
        verify(
            body.public_key,
            registration_message(body.name, body.public_key, body.timestamp),
            body.signature,
        )
    except SignatureInvalid:
        raise Unauthorized("registration signature does not match public_key") from None
    worker, token = await request.app[STORE].register_worker(
        body.name, body.public_key, call.account
    )
    return WorkerRegistered(worker_id=worker.id, token=token)


@API.route(
    "POST",
    "/api/v1/workers/pop",
    summary="Lease the best queued job that fits; waits up to `wait` seconds for one",
    body=PopRequest,
    response=PopResponse,
    auth="worker",
    errors=(403,),
    limit="pop",
)
async def pop(request: web.Request, call: Call) -> PopResponse:
    store, signals = request.app[STORE], request.app[SIGNALS]
    body: PopRequest = call.body
    worker = call.worker
    assert worker is not None
    await store.record_poll(worker)
    job = await long_poll(
        request,
        body.wait,
        lambda: store.pop_job(worker, body.models, body.max_pixels, body.max_steps),
    )
    if job is None:
        return PopResponse(job=None)
    signals.job_changed(job.id)
    signals.queue_changed()
    assert job.lease_deadline is not None
    return PopResponse(
        job=LeasedJob(
            id=job.id,
            params=job.params,
            params_hash=job.params_hash,
            lease_seconds=job.lease_seconds,
            lease_deadline=job.lease_deadline,
        )
    )


@API.route(
    "POST",
    "/api/v1/jobs/{job_id}/progress",
    summary="Report step progress; extends the lease",
    body=ProgressReport,
    response=LeaseExtended,
    auth="worker",
    errors=(404, 409),
)
async def progress(request: web.Request, call: Call) -> LeaseExtended:
    assert call.worker is not None
    body: ProgressReport = call.body
    job = await request.app[STORE].report_progress(
        call.worker, request.match_info["job_id"], body.image, body.step, body.steps
    )
    request.app[SIGNALS].job_changed(job.id)
    assert job.lease_deadline is not None
    return LeaseExtended(id=job.id, lease_deadline=job.lease_deadline)


def _checked_images(
    job_id: str, params_hash: str, expected_seeds: list[int], worker: Worker, body: ResultSubmit
) -> list[tuple[ResultRecord, bytes]]:
    """Decode and verify every submitted image, or raise naming the bad field."""
    indexes = sorted(image.index for image in body.images)
    if indexes != list(range(len(expected_seeds))):
        raise BadRequest(
            f"submit exactly images 0..{len(expected_seeds) - 1}, once each; got {indexes}",
            [("images", f"must hold indexes 0..{len(expected_seeds) - 1} once each")],
        )
    checked = []
    for position, image in enumerate(body.images):
        field = f"images[{position}]"
        try:
            data = base64.b64decode(image.png_base64, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(
                f"{field}.png_base64 is not base64", [(f"{field}.png_base64", "must be base64")]
            ) from None
        if not data.startswith(PNG_MAGIC):
            raise BadRequest(
                f"{field} is not a PNG", [(f"{field}.png_base64", "must be a PNG file")]
            )
        if sha256_hex(data) != image.sha256:
            raise BadRequest(
                f"{field}.sha256 does not match the image bytes",
                [(f"{field}.sha256", "must be the SHA-256 of the PNG")],
            )
        expected = expected_seeds[image.index]
        if image.seed != expected:
            raise BadRequest(
                f"{field}.seed is {image.seed}, but image {image.index} must use seed {expected}",
                [(f"{field}.seed", f"must be {expected}")],
            )
        try:
            verify(
                worker.public_key,
                result_message(job_id, params_hash, image.sha256),
                image.signature,
            )
        except SignatureInvalid:
            raise Unauthorized(
                f"{field}.signature does not verify with this worker's key"
            ) from None
        checked.append((ResultRecord(image.index, image.seed, image.sha256, image.signature), data))
    return sorted(checked, key=lambda item: item[0].index)


@API.route(
    "POST",
    "/api/v1/jobs/{job_id}/result",
    summary="Submit a leased job's signed images; the coordinator verifies, stores and pays",
    body=ResultSubmit,
    response=ResultAccepted,
    auth="worker",
    upload=True,
    errors=(404, 409),
)
async def submit_result(request: web.Request, call: Call) -> ResultAccepted:
    store, files = request.app[STORE], request.app[FILES]
    worker = call.worker
    assert worker is not None
    job_id = request.match_info["job_id"]
    job = await store.get_job(job_id)
    if job is None or job.state != "leased" or job.worker_id != worker.id:
        raise Conflict(
            f"job {job_id} is not leased to this worker; it may have been given to another"
        )
    checked = _checked_images(job.id, job.params_hash, job.params.seeds(), worker, call.body)
    # Files first (content-addressed, idempotent), then the transaction that makes them visible.
    for _, data in checked:
        files.put(data)
    agrees = None
    if job.verify_of is not None:
        agrees = await _check_agrees(request, worker, job, [data for _, data in checked])
    paid, held = await store.finish_job(worker, job, [record for record, _ in checked], agrees)
    request.app[SIGNALS].job_changed(job.id)
    if job.verify_of is not None:
        request.app[SIGNALS].job_changed(job.verify_of)
    request.app[SIGNALS].queue_changed()
    return ResultAccepted(id=job.id, kudos_earned=paid, kudos_held=held)


async def _check_agrees(
    request: web.Request, verifier: Worker, job: Job, images: list[bytes]
) -> bool:
    """Whether a spot check's images match the original job's (see coordinator.verification)."""
    store, files, config = request.app[STORE], request.app[FILES], request.app[CONFIG]
    original = await store.original_results(job)
    if len(original) != len(images):
        return False
    assert job.verify_of is not None
    checked = await store.get_job(job.verify_of)
    mine = await store.worker_row(verifier.id)
    theirs = await store.worker_row(checked.worker_id) if checked and checked.worker_id else None
    identical = same_build(
        mine.engine if mine is not None else None, theirs.engine if theirs is not None else None
    )
    for record, data in zip(original, images, strict=True):
        before = await asyncio.to_thread(files.get, record.sha256)
        same = await asyncio.to_thread(
            images_agree, before, data, identical, config.verify_tolerance
        )
        if not same:
            return False
    return True


@API.route(
    "POST",
    "/api/v1/jobs/{job_id}/fail",
    summary="Give a leased job back (engine crash, timeout): requeued, or refunded "
    "after too many tries",
    body=FailureReport,
    response=JobStatus,
    auth="worker",
    errors=(404, 409),
)
async def fail(request: web.Request, call: Call) -> JobStatus:
    assert call.worker is not None
    job = await request.app[STORE].fail_job(
        call.worker, request.match_info["job_id"], call.body.reason
    )
    request.app[SIGNALS].job_changed(job.id)
    request.app[SIGNALS].queue_changed()
    return await job_status(request, job)
