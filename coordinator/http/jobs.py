"""Image jobs as the requester sees them: submit, status, live events, images."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Annotated, Any

from aiohttp import web

from coordinator.db.request_keys import Idempotent
from coordinator.economy import image_models
from coordinator.errors import BadRequest, NotFound
from coordinator.http.addresses import client_ip
from coordinator.http.api import API, Call, UserCall
from coordinator.http.idempotency import submit_key
from coordinator.http.params import Choice, WholeNumber
from coordinator.http.possible import unservable_job
from coordinator.http.state import CONFIG, FILES, PREVIEWS, SIGNALS, STORE
from coordinator.http.streams import follow, open_stream
from coordinator.jobs.source_check import CheckedSources, check_sources
from coordinator.store import Account, ImageJob, Store
from protocol.messages import (
    DisputeCreate,
    DisputeRecorded,
    ImageInfo,
    ImageJobCreated,
    ImageJobRequest,
    JobList,
    JobStatus,
)
from protocol.params import MAX_SEED, ImageParams

log = logging.getLogger(__name__)

# served with every result image: nothing loads, nothing runs, no same-origin access
IMAGE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox"


def check_anonymous_limits(request: web.Request, params: ImageParams) -> None:
    config = request.app[CONFIG]
    problems = []
    if params.pixels > config.anonymous_max_pixels:
        problems.append(
            (
                "width",
                f"anonymous requests may have at most {config.anonymous_max_pixels} pixels "
                "(width x height); make it smaller or send an API key",
            )
        )
    if params.steps > config.anonymous_max_steps:
        problems.append(
            (
                "steps",
                f"anonymous requests may use at most {config.anonymous_max_steps} steps; "
                "use fewer or send an API key",
            )
        )
    if params.n > config.anonymous_max_n:
        problems.append(
            (
                "n",
                f"anonymous requests may ask for at most {config.anonymous_max_n} images; "
                "ask for fewer or send an API key",
            )
        )
    if problems:
        raise BadRequest("; ".join(f"{f}: {m}" for f, m in problems), problems)


@API.route(
    "POST",
    "/api/v1/jobs/image",
    summary="Queue an image job; its cost is reserved from the caller's kudos. With an "
    "Idempotency-Key header a retry of the same body gets the same job and pays nothing more; "
    "the same key with another body is 409",
    response=ImageJobCreated,
    auth="optional",
    status=202,
    errors=(402, 409),
    limit="submit",
)
async def submit_image(request: web.Request, call: Call[ImageJobRequest]) -> ImageJobCreated:
    body = call.body
    params = body.params()
    if "width" not in body.model_fields_set and "height" not in body.model_fields_set:
        params = image_models.with_default_size(request.app[CONFIG], params)
    params, sources = await with_sources(
        params, body.source_image or None, body.source_mask or None
    )
    job = await queue_image(
        request,
        call.account,
        params,
        nsfw=body.nsfw,
        signed_only=body.signed_only,
        idempotent=submit_key(request, call.account is None, body),
        sources=sources,
    )
    position, eta = await request.app[STORE].image_jobs.queue_info(job.id, job)
    assert job.params.seed is not None
    unservable = await unservable_job(request, job)
    return ImageJobCreated(
        id=job.id,
        kudos_cost=job.cost,
        seed=job.params.seed,
        queue_position=position,
        eta_seconds=eta,
        warnings=[] if unservable is None else [f"{unservable}; the job waits until one can"],
    )


async def with_sources(
    params: ImageParams, source_image: str | None, source_mask: str | None
) -> tuple[ImageParams, CheckedSources]:
    """The parameters with the digests of the job's source image and mask (base64, as the
    requester sent them), and the checked bytes to store; BadImage naming the field when
    one is missing, extra or unusable (coordinator.jobs.source_check). Nothing is stored
    or charged yet."""
    if source_image or source_mask or params.source_processing != "txt2img":
        sources = await asyncio.to_thread(
            check_sources, params.source_processing, source_image, source_mask
        )
    else:  # nothing to decode: no thread hop
        sources = check_sources(params.source_processing, None, None)
    digests = sources.digests + [None, None]
    update = {"source_image": digests[0], "source_mask": digests[1]}
    return ImageParams.model_validate({**params.model_dump(), **update}), sources


async def queue_image(
    request: web.Request,
    account: Account | None,
    params: ImageParams,
    *,
    nsfw: bool = False,
    prefix: str = "",
    signed_only: bool = False,
    horde: dict[str, Any] | None = None,
    idempotent: Idempotent | None = None,
    sources: CheckedSources | None = None,
) -> ImageJob:
    """Queue an image job for `account` (anonymous: None) from any door: the anonymous
    limits, the source image and mask stored (`with_sources` checked them), the seed fixed
    now, the cost reserved, the workers woken. With `idempotent`, a replay gets the first
    job (coordinator.http.idempotency). A job naming a model of the image model reference
    is held to its limits (`nsfw`: the request says it is NSFW; `prefix`: where the door
    keeps width and steps, coordinator.economy.image_models.check_job)."""
    image_models.check_job(request.app[CONFIG], params, nsfw, prefix)
    expected = [d for d in (params.source_image, params.source_mask) if d is not None]
    if (params.source_processing != "txt2img" and not expected) or (
        sources is not None and sources.digests != expected
    ):  # pragma: no cover - every door checks its sources with with_sources
        message = f"{params.source_processing!r} needs a source image; send source_image"
        raise BadRequest(f"source_image: {message}", [("source_image", message)])
    store = request.app[STORE]
    account = account or await store.accounts.anonymous_account(client_ip(request))
    if account.anonymous:
        check_anonymous_limits(request, params)
    if sources is not None:
        # content-addressed: a retry or another job with the same image stores nothing new
        for blob, digest in zip(sources.blobs, sources.digests, strict=True):
            if not await request.app[FILES].exists(digest):
                await request.app[FILES].put_bytes(blob, digest)
    if params.seed is None:
        params = params.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
    job = await store.image_jobs.create(
        account,
        params,
        image_models.price(request.app[CONFIG], params),
        signed_only=signed_only,
        horde=horde,
        idempotent=idempotent,
    )
    request.app[SIGNALS].job_queued("image", params.model)
    return job


async def owned_job(
    store: Store, job_id: str, account: Account | None, *, viewing: bool = True
) -> ImageJob:
    """The job, if the caller may see it (`viewing`) or change it: the requester's key, or
    anyone holding the id of an anonymous job; for viewing also any registered user when
    the job is shared."""
    job = await store.image_jobs.get(job_id)
    anonymous = (await store.accounts.anonymous_account()).id
    if job is None or job.verify_of is not None:
        raise NotFound(f"no job {job_id} visible to this API key")
    mine = job.account_id == anonymous or (account is not None and account.id == job.account_id)
    if not mine and not (viewing and job.shared and account is not None):
        # Same answer whether it does not exist or is someone else's: ids do not leak.
        raise NotFound(f"no job {job_id} visible to this API key")
    return job


async def job_status(request: web.Request, job: ImageJob) -> JobStatus:
    store = request.app[STORE]
    images = []
    records = await store.image_jobs.results(job.id) if job.state == "done" else []
    if records:
        rated = await store.ledger.image_ratings(job.id)
        for record in records:
            url = str(
                request.url.with_path(f"/api/v1/jobs/{job.id}/images/{record.index}").with_query(
                    None
                )
            )
            mean, count = rated.get(record.index, (None, 0))
            images.append(
                ImageInfo(
                    index=record.index,
                    seed=record.seed,
                    sha256=record.sha256,
                    url=url,
                    rating=mean,
                    ratings=count,
                )
            )
    position, eta = (
        await store.image_jobs.queue_info(job.id, job) if not job.finished else (None, None)
    )
    # whole seconds, so a stream does not send an event for every small drift
    eta = None if eta is None else float(round(eta))
    return JobStatus(
        id=job.id,
        state=job.state,
        queue_position=position,
        n=job.params.n,
        seeds=job.params.seeds(),
        kudos_cost=job.cost,
        image=job.image,
        step=job.step,
        steps=job.steps_total,
        attempts=job.attempts,
        error=job.error if job.state in ("failed", "queued", "cancelled") else None,
        images=images,
        eta_seconds=eta,
        shared=job.shared,
        params=job.params,
        created_at=job.created_at,
        signed=all(record.signature for record in records),
        disputable=job.held_until is not None,
    )


@API.route(
    "GET",
    "/api/v1/jobs/{job_id}",
    summary="A job's state, queue position, progress and images",
    response=JobStatus,
    auth="optional",
    errors=(404,),
)
async def get_job(request: web.Request, call: Call[None]) -> JobStatus:
    job = await owned_job(request.app[STORE], request.match_info["job_id"], call.account)
    return await job_status(request, job)


@API.route(
    "GET",
    "/api/v1/jobs/{job_id}/events",
    summary="Server-sent events: a `status` event (a JobStatus) on every change, until done; "
    "with ?previews=true also a `preview` event (a JobPreview: a small picture of the image "
    "being sampled) every few steps while a worker runs it",
    auth="optional",
    produces="text/event-stream",
    errors=(404,),
    limit="stream",
)
async def job_events(
    request: web.Request,
    call: Call[None],
    previews: Annotated[
        str,
        Choice(
            "true: also send `preview` events, live pictures of the image being sampled",
            ("true", "false"),
        ),
    ] = "false",
) -> web.StreamResponse:
    store = request.app[STORE]
    job = await owned_job(store, request.match_info["job_id"], call.account)

    async def read() -> ImageJob:
        found = await store.image_jobs.get(job.id)
        assert found is not None
        return found

    last: JobStatus | None = None
    shown = 0
    held = request.app[PREVIEWS]
    watching: contextlib.AbstractContextManager[None] = (
        held.watching(job.id) if previews == "true" else contextlib.nullcontext()
    )
    async with open_stream(request, call.account, f"event stream of job {job.id}") as stream:
        with watching:
            async for current in follow(
                request, job.id, read, lambda j: j.finished, lambda j: j.state == "queued"
            ):
                status = await job_status(request, current)
                sent = status != last
                if sent:
                    await stream.send(status.model_dump_json(), "status")
                    last = status
                latest = None if current.finished else held.latest(job.id, shown)
                if previews == "true" and latest is not None:
                    shown, preview = latest
                    await stream.send(preview.model_dump_json(), "preview")
                elif not sent:
                    await stream.keepalive()
    return stream.response


@API.route(
    "GET",
    "/api/v1/jobs/{job_id}/images/{index}",
    summary="One PNG of a finished job",
    auth="optional",
    produces="image/png",
    errors=(404,),
)
async def get_image(request: web.Request, call: Call[None]) -> web.StreamResponse:
    store = request.app[STORE]
    job = await owned_job(store, request.match_info["job_id"], call.account)
    index = request.match_info["index"]
    for record in await store.image_jobs.results(job.id):
        if str(record.index) == index:
            return await request.app[FILES].response(
                request,
                record.sha256,
                {
                    "Content-Type": "image/png",
                    "ETag": f'"{record.sha256}"',
                    "Cache-Control": "private, max-age=31536000",
                    # the bytes came from a worker: never let a browser guess another type,
                    # nor run anything should it be opened as a document
                    "X-Content-Type-Options": "nosniff",
                    "Content-Security-Policy": IMAGE_CSP,
                },
            )
    raise NotFound(f"job {job.id} has no image {index} (yet); check the job's state first")


@API.route(
    "GET",
    "/api/v1/jobs",
    summary="The caller's image jobs, newest first, with their parameters and images "
    "(?limit=1..100, ?offset=N)",
    response=JobList,
    auth="user",
)
async def list_jobs(
    request: web.Request,
    call: UserCall[None],
    limit: Annotated[int, WholeNumber("jobs to return (default 20)", 1, 100)] = 20,
    offset: Annotated[
        int, WholeNumber("jobs to skip (next_offset of the page before)", 0, 10**9)
    ] = 0,
) -> JobList:
    found = await request.app[STORE].image_jobs.account_jobs(call.account, limit + 1, offset)
    statuses = [await job_status(request, job) for job in found[:limit]]
    return JobList(jobs=statuses, next_offset=offset + limit if len(found) > limit else None)


@API.route(
    "POST",
    "/api/v1/jobs/{job_id}/dispute",
    summary="Dispute images nobody can check (an AI Horde worker's, unsigned; or refined by "
    "a refiner no trusted worker has) while their pay is held: the kudos come back, the "
    "images are deleted and the worker takes a "
    "suspicion (at most --max-disputes-per-day, and --max-dispute-share of your jobs)",
    response=DisputeRecorded,
    auth="user",
    errors=(403, 404, 409),
    limit="cancel",
)
async def dispute(request: web.Request, call: UserCall[DisputeCreate]) -> DisputeRecorded:
    store = request.app[STORE]
    job = await owned_job(store, request.match_info["job_id"], call.account, viewing=False)
    body = call.body
    refunded, unused = await store.image_jobs.dispute(job.id, body.reason or "no reason given")
    # whoever disputes does not keep the images
    for digest in unused:
        await request.app[FILES].remove(digest)
    request.app[SIGNALS].job_changed(job.id)
    return DisputeRecorded(id=job.id, refunded=refunded)
