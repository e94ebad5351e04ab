"""A worker's result: each image uploaded as a raw PNG, then one request that pays.

    PUT  /api/v1/jobs/{job_id}/images/{index}   body: the PNG (Content-Type: image/png);
         headers X-Image-Seed, X-Image-Sha256, X-Image-Signature. Streamed to disk while
         hashed, at most png_check.byte_limit(width, height) bytes (413 past it), checked
         (seed, signature, hash, a decodable PNG of the job's size) and stored.
    POST /api/v1/jobs/{job_id}/result            JSON: index, seed, sha256, signature per
         image; every image must have been uploaded by this worker. Verifies, settles the
         ledger and makes the images visible.
    PUT  /api/v1/jobs/{job_id}/images/0/result  a job of one image without LoRAs or TIs:
         the upload and the result in one request (the same checks, then the same settling;
         no upload marker is needed).

Nothing is paid for an image that was refused, and a refused upload leaves no file behind.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re

from aiohttp import web

from coordinator.economy.verification import Outcome, images_agree, same_build
from coordinator.errors import BadImage, BadRequest, BodyTooLarge, Conflict, Unauthorized
from coordinator.http.api import API, WorkerCall
from coordinator.http.result_adapters import record_adapters
from coordinator.http.state import CONFIG, FILES, SIGNALS, STORE
from coordinator.jobs.png_check import (
    MAX_PNG_BYTES,
    byte_limit,
    check_png,
    check_png_bytes,
    read_pixels,
)
from coordinator.store import ImageJob, ResultRecord, Worker
from protocol.errors import SignatureInvalid
from protocol.messages import (
    IMAGE_SEED_HEADER,
    IMAGE_SHA256_HEADER,
    IMAGE_SIGNATURE_HEADER,
    ImageUploaded,
    ResultAccepted,
    ResultSubmit,
)
from protocol.signing import result_message, sha256_hex, verify

__all__ = ["submit_result", "upload_final_image", "upload_image"]

log = logging.getLogger(__name__)

_DECIMAL = re.compile(r"[0-9]{1,20}")
_HEX_64 = re.compile(r"[0-9a-f]{64}")
_HEX_128 = re.compile(r"[0-9a-f]{128}")
# an upload of an image already stored is read whole into memory up to this size
_IN_MEMORY_BYTES = 1024 * 1024


async def _leased_job(request: web.Request, worker: Worker) -> ImageJob:
    job_id = request.match_info["job_id"]
    job = await request.app[STORE].image_jobs.get(job_id)
    if job is None or job.state != "leased" or job.worker_id != worker.id:
        raise Conflict(
            f"job {job_id} is not leased to this worker; it may have been given to another"
        )
    return job


@functools.lru_cache(maxsize=4096)
def _verified(public_key: str, job_id: str, params_hash: str, sha256: str, signature: str) -> None:
    """verify(...) of an image's signature, remembered when it verifies: the upload checks
    it and the result names the same signature again (a failure is never remembered)."""
    verify(public_key, result_message(job_id, params_hash, sha256), signature)


def _check_signature(
    worker: Worker, job: ImageJob, sha256: str, signature: str, field: str
) -> None:
    try:
        _verified(worker.public_key, job.id, job.params_hash, sha256, signature)
    except SignatureInvalid:
        raise Unauthorized(
            f"{field}: the signature does not verify with this worker's key",
            [(field, "must sign result_message(job id, params hash, sha256) with your key")],
        ) from None


def _upload_headers(request: web.Request, job: ImageJob, index: int) -> tuple[int, str, str]:
    """The upload's seed, SHA-256 and signature headers, checked for form and seed."""
    values = {}
    for name, pattern, what in (
        (IMAGE_SEED_HEADER, _DECIMAL, "the image's seed, a decimal integer"),
        (IMAGE_SHA256_HEADER, _HEX_64, "the SHA-256 of the PNG, 64 lowercase hex digits"),
        (IMAGE_SIGNATURE_HEADER, _HEX_128, "the Ed25519 signature, 128 lowercase hex digits"),
    ):
        value = request.headers.get(name, "")
        if not pattern.fullmatch(value):
            raise BadRequest(f"header {name} is missing or malformed", [(name, f"must be {what}")])
        values[name] = value
    seed = int(values[IMAGE_SEED_HEADER])
    expected = job.params.seeds()[index]
    if seed != expected:
        raise BadRequest(
            f"{IMAGE_SEED_HEADER} is {seed}, but image {index} must use seed {expected}",
            [(IMAGE_SEED_HEADER, f"must be {expected}")],
        )
    return seed, values[IMAGE_SHA256_HEADER], values[IMAGE_SIGNATURE_HEADER]


def _image_index(request: web.Request, job: ImageJob) -> int:
    raw = request.match_info["index"]
    if not _DECIMAL.fullmatch(raw) or int(raw) >= job.params.n:
        raise BadRequest(
            f"job {job.id} has images 0..{job.params.n - 1}; there is no image {raw}",
            [("index", f"must be 0..{job.params.n - 1}")],
        )
    return int(raw)


@API.route(
    "PUT",
    "/api/v1/jobs/{job_id}/images/{index}",
    summary="Upload one image of a leased job: the raw PNG, with its seed, SHA-256 and "
    "signature in headers; the result request then pays for all of them",
    raw="image/png",
    headers=(
        (IMAGE_SEED_HEADER, "the image's seed (the job's seed + index)"),
        (IMAGE_SHA256_HEADER, "SHA-256 of the body, lowercase hex"),
        (IMAGE_SIGNATURE_HEADER, "Ed25519 signature over result_message(job, params hash, sha)"),
    ),
    response=ImageUploaded,
    auth="worker",
    errors=(401, 409),
    limit="result",
)
async def upload_image(request: web.Request, call: WorkerCall[None]) -> ImageUploaded:
    worker = call.worker
    job = await _leased_job(request, worker)
    index = _image_index(request, job)
    _, sha256, _ = await _receive(request, worker, job, index)
    await request.app[FILES].mark(job.id, worker.id, index, sha256)
    return ImageUploaded(id=job.id, index=index, sha256=sha256)


async def _receive(
    request: web.Request, worker: Worker, job: ImageJob, index: int
) -> tuple[int, str, str]:
    """Check an upload's headers, receive its PNG, check it and store it (synced): its
    seed, SHA-256 and signature."""
    seed, sha256, signature = _upload_headers(request, job, index)
    _check_signature(worker, job, sha256, signature, IMAGE_SIGNATURE_HEADER)
    if request.content_type != "image/png":
        raise BadRequest(
            f"Content-Type is {request.content_type}; send the PNG's bytes as image/png",
            [("Content-Type", "must be image/png")],
        )
    width, height = job.params.output_size  # (an upscaler makes it larger)
    limit = min(byte_limit(width, height), MAX_PNG_BYTES)
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"the image is {request.content_length} bytes; a {width}x{height} PNG may have "
            f"at most {limit}",
            [("body", f"must be at most {limit} bytes")],
        )
    files = request.app[FILES]
    if (
        request.content_length is not None
        and request.content_length <= _IN_MEMORY_BYTES
        and await files.stored_already(sha256)
    ):
        # an image already stored (synced when it was), as uploaded again or made again
        # by a spot check: checked in memory, nothing to write
        data = await request.content.read()
        _check_digest(sha256_hex(data), sha256)
        await asyncio.to_thread(check_png_bytes, data, width, height)
        return seed, sha256, signature
    # the PNG is decoded in the thread that writes the upload's end (one hop, not two)
    check = functools.partial(check_png, width=width, height=height)
    async with files.spool(request.content, limit, check) as spooled:
        _check_digest(spooled.sha256, sha256)
        if spooled.refused is not None:
            raise spooled.refused
        # Content-addressed, so storing it before the job is paid is harmless.
        await files.keep(spooled)
    return seed, sha256, signature


def _check_digest(received: str, claimed: str) -> None:
    if received != claimed:
        raise BadRequest(
            f"{IMAGE_SHA256_HEADER} does not match the body (its SHA-256 is {received})",
            [(IMAGE_SHA256_HEADER, "must be the SHA-256 of the body")],
        )


@API.route(
    "PUT",
    "/api/v1/jobs/{job_id}/images/{index}/result",
    summary="Upload the only image of a leased job without LoRAs or TIs and finish the job "
    "in one request: as the upload (the raw PNG, its seed, SHA-256 and signature in headers) "
    "followed by the result naming it",
    raw="image/png",
    headers=(
        (IMAGE_SEED_HEADER, "the image's seed (the job's seed)"),
        (IMAGE_SHA256_HEADER, "SHA-256 of the body, lowercase hex"),
        (IMAGE_SIGNATURE_HEADER, "Ed25519 signature over result_message(job, params hash, sha)"),
    ),
    response=ResultAccepted,
    auth="worker",
    errors=(401, 409),
    limit="result",
)
async def upload_final_image(request: web.Request, call: WorkerCall[None]) -> ResultAccepted:
    worker = call.worker
    job = await _leased_job(request, worker)
    index = _image_index(request, job)
    if job.params.n != 1 or job.params.loras or job.params.tis:
        upload_path = f"/api/v1/jobs/{job.id}/images/{index}"
        what = "LoRAs or TIs" if job.params.n == 1 else f"{job.params.n} images"
        raise BadRequest(
            f"job {job.id} has {what}: PUT each image to {upload_path}, then POST the "
            f"result (naming any LoRAs and TIs used) to /api/v1/jobs/{job.id}/result",
            [("path", "finish in one request only a job of one image without LoRAs or TIs")],
        )
    # (no marker: the result is this request; one left by an earlier upload of the image
    # is pruned by age)
    seed, sha256, signature = await _receive(request, worker, job, index)
    records = [ResultRecord(index, seed, sha256, signature)]
    return await _finish(request, worker, job, records, marked=False)


async def _checked_records(
    request: web.Request, job: ImageJob, worker: Worker, body: ResultSubmit
) -> list[ResultRecord]:
    """Verify every image of the result against its upload, or raise naming the field."""
    expected_seeds = job.params.seeds()
    last = len(expected_seeds) - 1
    indexes = sorted(image.index for image in body.images)
    if indexes != list(range(len(expected_seeds))):
        raise BadRequest(
            f"submit exactly images 0..{last}, once each; got {indexes}",
            [("images", f"must hold indexes 0..{last} once each")],
        )
    files = request.app[FILES]

    # what was uploaded (and is still stored) for each index
    uploaded_of = {}
    for index in indexes:
        digest = await files.marked(job.id, worker.id, index)
        uploaded_of[index] = digest if digest and await files.exists(digest) else None
    records = []
    for position, image in enumerate(body.images):
        field = f"images[{position}]"
        expected = expected_seeds[image.index]
        if image.seed != expected:
            raise BadRequest(
                f"{field}.seed is {image.seed}, but image {image.index} must use seed {expected}",
                [(f"{field}.seed", f"must be {expected}")],
            )
        _check_signature(worker, job, image.sha256, image.signature, f"{field}.signature")
        uploaded = uploaded_of[image.index]
        upload_path = f"/api/v1/jobs/{job.id}/images/{image.index}"
        if uploaded is None:
            raise BadRequest(
                f"image {image.index} was not uploaded; PUT its PNG to {upload_path} first",
                [(field, f"upload image {image.index} first")],
            )
        if uploaded != image.sha256:
            raise BadRequest(
                f"{field}.sha256 is not the hash of the uploaded image {image.index} "
                f"({uploaded}); upload the image again or send its hash",
                [(f"{field}.sha256", "must be the SHA-256 of the uploaded image")],
            )
        records.append(ResultRecord(image.index, image.seed, image.sha256, image.signature))
    return sorted(records, key=lambda record: record.index)


@API.route(
    "POST",
    "/api/v1/jobs/{job_id}/result",
    summary="Finish a leased job whose images are uploaded: the coordinator verifies the "
    "signed list and pays",
    response=ResultAccepted,
    auth="worker",
    errors=(401, 409),
    limit="result",
)
async def submit_result(request: web.Request, call: WorkerCall[ResultSubmit]) -> ResultAccepted:
    worker = call.worker
    job = await _leased_job(request, worker)
    records = await _checked_records(request, job, worker, call.body)
    await record_adapters(request, job, worker, call.body)
    return await _finish(request, worker, job, records, marked=True)


async def _finish(
    request: web.Request,
    worker: Worker,
    job: ImageJob,
    records: list[ResultRecord],
    *,
    marked: bool,
) -> ResultAccepted:
    """Settle a leased job whose images are checked and stored: pay, and forget its
    upload markers if they were `marked`."""
    store, signals = request.app[STORE], request.app[SIGNALS]
    outcome = None
    if job.verify_of is not None:
        outcome = await _check_outcome(request, worker, job, [r.sha256 for r in records])
    paid, held = await store.image_jobs.finish(worker, job, records, outcome)
    if marked:
        await request.app[FILES].discard(job.id, worker.id, job.params.n)
    signals.job_changed(job.id)
    if job.verify_of is not None:
        signals.job_changed(job.verify_of)
    # the result may have scheduled a spot check for a trusted worker
    signals.job_queued("image", job.params.model)
    return ResultAccepted(id=job.id, kudos_earned=paid, kudos_held=held)


async def _check_outcome(
    request: web.Request, verifier: Worker, job: ImageJob, digests: list[str]
) -> Outcome:
    """What a spot check's images say about the original's (coordinator.economy.verification).
    Both sides are decoded with the job's size as a cap; one that cannot be decoded counts
    against whoever made it, so the check always concludes."""
    store, files, config = request.app[STORE], request.app[FILES], request.app[CONFIG]
    original = await store.image_jobs.original_results(job)
    if len(original) != len(digests):
        return "original unreadable"
    assert job.verify_of is not None
    checked = await store.image_jobs.get(job.verify_of)
    mine = await store.workers.worker_row(verifier.id)
    theirs = (
        await store.workers.worker_row(checked.worker_id) if checked and checked.worker_id else None
    )
    identical = same_build(
        mine.engine if mine is not None else None, theirs.engine if theirs is not None else None
    )
    width, height = job.params.output_size
    for record, digest in zip(original, digests, strict=True):
        try:
            async with files.local_copy(record.sha256) as path:
                before = await asyncio.to_thread(read_pixels, path, width, height)
        except BadImage as exc:
            log.warning("spot check %s: original image %d refused: %s", job.id, record.index, exc)
            return "original unreadable"
        try:
            async with files.local_copy(digest) as path:
                after = await asyncio.to_thread(read_pixels, path, width, height)
        except BadImage as exc:  # its upload was decoded the same way: unlikely
            log.warning("spot check %s: its image %d refused: %s", job.id, record.index, exc)
            return "check unreadable"
        same = await asyncio.to_thread(
            images_agree, before, after, identical, config.verify_tolerance
        )
        if not same:
            return "disagree"
    return "agree"
